"""Residual files ``P.residual.weight = W - s * basis`` (the published merge route needs them).

Two ways to get one: from the base model alone for a method/rank/seed (``save_flux_residual.py``,
``save_SD3_residual.py``), or from the bases stored in an adapter file (``extract_residual_from_checkpoint.py``),
which is exact for every static method, ICA included, because the file holds the very basis it was trained on.
Their flags live in ``qrlora.cli.residual``.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core.inject import validated_targets
from ..core.methods import AdapterConfig, get_method
from .checkpoint import AdapterFile


def residual_filename(backbone: str) -> str:
    return f"{backbone}_residual_weights.safetensors"


def base_residuals(denoiser, config: AdapterConfig, targets, blocks=None) -> dict[str, torch.Tensor]:
    """``W - s * basis`` for every targeted Linear, the basis initialised exactly as training would."""
    method = get_method(config.method)
    method.require_weight_change(f"--lora_init_method {config.method}", "a residual file is W minus a static basis",
                                 "merge it live, in the delta form")
    out = {}
    for path in tqdm(validated_targets(denoiser, config, targets, blocks), desc="residuals", unit="layer"):
        weight = denoiser.get_submodule(path).weight.detach()
        tensors = method.initialize(weight, config, path)
        out[path] = weight.float() - config.scale * method.basis_product(tensors)
    return out


def residual_bytes(adapter: AdapterFile) -> int:
    """Size of the residual file of ``adapter``: one float32 out x in weight per layer (the file's own shapes)."""
    factors = [adapter.method.lora_factors(t, 1.0) for t in adapter.layers.values()]  # B (out x k), A (k x in)
    return sum(4 * B.shape[0] * A.shape[1] for B, A in factors)
