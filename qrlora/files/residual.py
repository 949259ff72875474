"""Residual files ``P.residual.weight = W - s * basis`` (the published merge route needs them).

Two ways to get one: from the base model alone for a method/rank/seed (``save_flux_residual.py``,
``save_SD3_residual.py``), or from the bases stored in an adapter file (``extract_residual_from_checkpoint.py``),
which is exact for every static method, ICA included, because the file holds the very basis it was trained on.
Their flags live in ``qrlora.cli.residual``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..backbones import detect_backbone
from .checkpoint import AdapterFile, adapter_metadata, backbone_of, load_adapter, residuals_from_adapter, save_residual
from ..core.devices import DTYPES, resolve_device
from ..errors import UserError
from ..core.inject import validated_targets
from ..core.methods import AdapterConfig, get_method
from .outputs import check_writable, refuse_existing


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


def save_base_residual(args, backbone_name: str | None = None) -> Path:
    """Residual of every targeted layer of the base model, for a method, rank and seed (flags: ``qrlora.cli.residual``)."""
    backbone = detect_backbone(args.model_path, backbone_name)
    out = Path(args.output_dir) / residual_filename(backbone.name)
    check_writable(out.parent, "--output_dir")  # the size is known only once the model is loaded
    refuse_existing([out], args.overwrite)
    config = AdapterConfig(method=args.lora_init_method, rank=args.rank, alpha=args.lora_alpha, seed=args.seed)
    targets = args.lora_layers.split(",") if args.lora_layers else list(backbone.default_targets)
    denoiser = backbone.load_denoiser(args.model_path).to(resolve_device(args.device))
    residuals = base_residuals(denoiser, config, targets, args.lora_blocks.split(",") if args.lora_blocks else None)
    meta = adapter_metadata(config, component=backbone.denoiser_name, backbone=backbone.name, base_model=args.model_path, targets=targets)
    save_residual(out, residuals, {**meta, "format": "qrlora-residual"})
    print(f"wrote {len(residuals)} residual layers to {out}")
    return out


def residual_bytes(adapter: AdapterFile) -> int:
    """Size of the residual file of ``adapter``: one float32 out x in weight per layer (the file's own shapes)."""
    factors = [adapter.method.lora_factors(t, 1.0) for t in adapter.layers.values()]  # B (out x k), A (k x in)
    return sum(4 * B.shape[0] * A.shape[1] for B, A in factors)


def extract_residual(args) -> Path:
    """The residual from the bases stored in an adapter file (flags: ``qrlora.cli.residual``)."""
    adapter = load_adapter(args.lora_path)
    adapter.require_weight_change("a residual file is W minus a static basis", "merge it live, in the delta form")
    backbone = detect_backbone(args.model_path, backbone_of(adapter).name)
    out = Path(args.output_dir) / residual_filename(backbone.name)
    check_writable(out.parent, "--output_dir", residual_bytes(adapter))
    refuse_existing([out], args.overwrite)
    denoiser = backbone.load_denoiser(args.model_path, DTYPES[args.dtype]).to(resolve_device(args.device))
    weights = {}
    for path in adapter.layers:
        try:
            weights[path] = denoiser.get_submodule(path).weight.detach().float().cpu()
        except AttributeError:
            raise UserError(f"{args.lora_path}: layer {path} does not exist in {args.model_path}") from None
    residuals = residuals_from_adapter(adapter, weights)
    save_residual(out, residuals, {"format": "qrlora-residual", "source_adapter": str(args.lora_path),
                                   "base_model": args.model_path, "backbone": backbone.name})
    print(f"wrote {len(residuals)} residual layers to {out}")
    return out
