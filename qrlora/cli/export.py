"""``python -m qrlora.export`` / ``qrlora-export``: a standard LoRA file from a QR-LoRA adapter (``qrlora.files.export``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open

from ..files import export
from ..files.checkpoint import load_adapter
from ..backbones import BACKBONES
from ..errors import UserError, cli_entry
from .arguments import ArgumentParser


def export_file(args) -> Path:
    """The command's work: ``args.input`` to ``args.output`` in ``args.format`` (``qrlora.files.export.export_lora``)."""
    out = Path(args.output)
    if out.is_dir():  # checked first: --overwrite replaces a file, never a folder
        raise UserError(f"{out} is a folder; give the path of the LoRA file to write (e.g. {out / 'lora.safetensors'})")
    adapter = load_adapter(args.input)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    if out.resolve() == Path(args.input).resolve():
        raise UserError(f"{out} is the input file; choose another output path")
    export.export_lora(adapter, out, args.format, args.backbone)
    with safe_open(str(out), framework="pt") as f:
        modules = sum(k.endswith(("lora_A.weight", "lora_down.weight")) for k in f.keys())
    print(f"wrote {out}: {args.format} layout, {modules} LoRA modules for {len(adapter.layers)} adapted layers")
    return out


@cli_entry
def main(argv=None) -> Path:
    p = ArgumentParser(prog="python -m qrlora.export", description=export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a QR-LoRA adapter file (pytorch_lora_weights.safetensors)")
    p.add_argument("output", help="the LoRA file to write")
    p.add_argument("--format", choices=export.FORMATS, default="diffusers",
                   help="diffusers: diffusers / PEFT layout (default); kohya: ComfyUI, A1111/Forge, kohya sd-scripts")
    p.add_argument("--backbone", choices=list(BACKBONES),
                   help="the adapter's model family, for --format kohya on files without metadata (default: read from the file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (never a folder)")
    return export_file(p.parse_args(argv))
