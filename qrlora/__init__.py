"""QR-LoRA: QR-decomposed adapters for text-to-image diffusion models (FLUX.1, SD3, SDXL).

The library modules, by job: ``decompose`` (float32 math), ``methods`` (the registry), ``layers`` (the adapter
layer), ``inject`` (targeting), ``checkpoint`` (files), ``merge`` (merges), ``residual`` / ``export`` (residual and
diffusers / kohya LoRA files), ``model_card`` / ``hub`` / ``tracking`` (what a run publishes: model card, hub
upload, tracker images), ``runs`` (finding the runs the wrappers wrote), ``inference`` (merge rendering),
``backbones`` (model families), ``data`` / ``prior`` (DreamBooth images), ``train`` (the trainer), ``quantize``
(fp8 / nf4 base), ``analysis`` (similarity, expert usage), ``tiny`` (offline test pipelines), ``errors``
(one-line CLI errors), ``strategies`` / ``ziplora`` / ``klora`` (merge strategies), ``evaluate`` (CLIP / DINO
scores), ``compare`` (the comparison command), ``tiny_scorers`` (offline CLIP and DINO models). ``cli`` holds
every command's flags and ``main`` (the one CLI layer; ``tiny`` still parses its own).
"""
from .methods import METHODS, AdapterConfig, get_method

__version__ = "0.2.0"
__all__ = ["METHODS", "AdapterConfig", "get_method", "__version__"]
