"""QR-LoRA: QR-decomposed adapters for text-to-image diffusion models (FLUX.1, SD3, SDXL).

The package's layout, what each subpackage does and the one-way import rule are described in one place:
docs/ARCHITECTURE.md section 3.
"""
from .core.methods import METHODS, AdapterConfig, get_method

__version__ = "0.2.0"
__all__ = ["METHODS", "AdapterConfig", "get_method", "__version__"]
