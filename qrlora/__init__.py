"""QR-LoRA: QR-decomposed adapters for text-to-image diffusion models (FLUX.1, SD3, SDXL).

The library modules, by job: ``decompose`` (float32 math), ``methods`` (the registry), ``layers`` (the adapter
layer), ``inject`` (targeting), ``checkpoint`` (files), ``merge`` (merges), ``backbones`` (model families),
``train`` (the trainer), ``analysis`` (similarity), ``tiny`` (offline test pipelines).
"""
from .methods import METHODS, AdapterConfig, get_method

__version__ = "0.1.0"
__all__ = ["METHODS", "AdapterConfig", "get_method", "__version__"]
