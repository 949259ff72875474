"""QR-LoRA: QR-decomposed adapters for text-to-image diffusion models (FLUX.1, SD3, SDXL).

The library, by job (docs/ARCHITECTURE.md section 3; imports run down this list, with no cycle): ``core`` (the
decomposition, the method registry, the adapter layer, injection, the objective), ``backbones`` (model families),
``files`` (adapter files, run folders, export, residuals, model cards), ``training`` (the one trainer and what it
uses), ``merging`` (the merger, merge strategies, merge rendering), ``evaluation`` (scores, the strategy comparison,
the analyses), ``toy`` (tiny offline pipelines and scorers, the CPU world and its study) and ``cli`` (every command).
``qrlora.train``, ``qrlora.merge``, ... are the published ``python -m`` names, shims over ``qrlora.cli``.
"""
from .core.methods import METHODS, AdapterConfig, get_method

__version__ = "0.2.0"
__all__ = ["METHODS", "AdapterConfig", "get_method", "__version__"]
