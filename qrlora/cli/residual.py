"""Residual-file CLIs: from the base model (``save_SD3_residual.py``, ``save_flux_residual.py``, ``qrlora-residual``)
and from an adapter file's stored bases (``extract_residual_from_checkpoint.py``, ``qrlora-extract-residual``).
The command bodies are ``save_base_residual`` and ``extract_residual``; the residual math is ``qrlora.files.residual``."""
from __future__ import annotations

from pathlib import Path

from ..backbones import BACKBONES
from ..core.devices import DTYPES, default_device
from ..errors import cli_entry
from ..core.methods import METHODS
from ..backbones import detect_backbone
from ..core.devices import resolve_device
from ..core.methods import AdapterConfig
from ..errors import UserError
from ..files.checkpoint import adapter_metadata, backbone_of, load_adapter, residuals_from_adapter, save_residual
from ..files.outputs import check_writable, refuse_existing
from ..files.residual import base_residuals, residual_bytes, residual_filename
from .arguments import ArgumentParser


def save_base_residual(args, backbone_name: str | None = None) -> Path:
    """Residual of every targeted layer of the base model, for a method, rank and seed (the command's work)."""
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


def extract_residual(args) -> Path:
    """The residual from the bases stored in an adapter file (the command's work)."""
    adapter = load_adapter(args.lora_path)
    adapter.require_weight_change("a residual file is W minus a static basis", "merge it live, in the delta form")
    backbone = detect_backbone(args.model_path, backbone_of(adapter).name)
    out = Path(args.output_dir) / residual_filename(backbone.name)
    check_writable(out.parent, "--output_dir", residual_bytes(adapter))
    refuse_existing([out], args.overwrite)
    denoiser = backbone.load_denoiser(args.model_path, DTYPES.get(args.dtype)).to(resolve_device(args.device))
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


@cli_entry
def save_base_residual_main(argv=None, backbone_name: str | None = None) -> Path:
    """Residual of every targeted layer of the base model, for a method, rank and seed."""
    p = ArgumentParser(description=save_base_residual_main.__doc__)
    p.add_argument("--model_path", "--pretrained_model_name_or_path", dest="model_path",
                   default=BACKBONES[backbone_name].default_model if backbone_name else None, required=backbone_name is None,
                   help="diffusers pipeline folder or hub id of the base model")
    p.add_argument("--rank", type=int, default=64, help="adapter rank the residual is for")
    p.add_argument("--lora_alpha", type=float, help="adapter alpha, the scale s = alpha / rank (default: the rank)")
    p.add_argument("--lora_init_method", choices=[m for m in METHODS if METHODS[m].static], default="triu_deltaR",
                   help="the adapter method whose frozen basis the residual removes")
    p.add_argument("--lora_layers", help="comma-separated targets (default: the backbone's)")
    p.add_argument("--lora_blocks", help="comma list of block names to restrict to, as at training (default: every block)")
    p.add_argument("--seed", type=int, default=0, help="the training seed (ICA bases depend on it)")
    p.add_argument("--device", default=default_device(), help="default: cuda if available, else cpu")
    p.add_argument("--output_dir", default=".", help="folder the residual file is written to")
    p.add_argument("--overwrite", action="store_true", help="replace an existing residual file")
    return save_base_residual(p.parse_args(argv), backbone_name)


@cli_entry
def extract_main(argv=None) -> Path:
    """The residual from the bases stored in an adapter file (exact for every static method, FLUX/SD3/SDXL)."""
    p = ArgumentParser(description=extract_main.__doc__)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id of the base model")
    p.add_argument("--lora_path", required=True, help="the adapter file whose stored bases give the residual")
    p.add_argument("--output_dir", required=True, help="folder the residual file is written to")
    p.add_argument("--device", default="cpu", help="where the residual is computed")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype to load the base weights in (default: as stored; each "
                   "layer is upcast to float32 for the subtraction, so a bf16 checkpoint gives the float32 load's file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing residual file")
    return extract_residual(p.parse_args(argv))
