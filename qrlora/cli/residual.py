"""Residual-file CLIs: from the base model (``save_SD3_residual.py``, ``save_flux_residual.py``, ``qrlora-residual``)
and from an adapter file's stored bases (``extract_residual_from_checkpoint.py``, ``qrlora-extract-residual``).
The work is ``qrlora.files.residual.save_base_residual`` and ``qrlora.files.residual.extract_residual``."""
from __future__ import annotations

from pathlib import Path

from ..backbones import BACKBONES
from ..core.devices import DTYPES, default_device
from ..errors import cli_entry
from ..core.methods import METHODS
from ..files.residual import extract_residual, save_base_residual
from .arguments import ArgumentParser


@cli_entry
def save_base_residual_main(argv=None, backbone_name: str | None = None) -> Path:
    """Residual of every targeted layer of the base model, for a method, rank and seed."""
    p = ArgumentParser(description=save_base_residual_main.__doc__)
    p.add_argument("--model_path", "--pretrained_model_name_or_path", dest="model_path",
                   default=BACKBONES[backbone_name].default_model if backbone_name else None, required=backbone_name is None)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lora_alpha", type=float)
    p.add_argument("--lora_init_method", choices=[m for m in METHODS if METHODS[m].static], default="triu_deltaR")
    p.add_argument("--lora_layers", help="comma-separated targets (default: the backbone's)")
    p.add_argument("--lora_blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=default_device(), help="default: cuda if available, else cpu")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--overwrite", action="store_true")
    return save_base_residual(p.parse_args(argv), backbone_name)


@cli_entry
def extract_main(argv=None) -> Path:
    """The residual from the bases stored in an adapter file (exact for every static method, FLUX/SD3/SDXL)."""
    p = ArgumentParser(description=extract_main.__doc__)
    p.add_argument("--model_path", required=True)
    p.add_argument("--lora_path", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype to load the base weights in")
    p.add_argument("--overwrite", action="store_true")
    return extract_residual(p.parse_args(argv))
