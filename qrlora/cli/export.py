"""``python -m qrlora.export`` / ``qrlora-export``: a standard LoRA file from a QR-LoRA adapter (``qrlora.files.export``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..files import export
from ..backbones import BACKBONES
from ..errors import cli_entry
from .arguments import ArgumentParser


@cli_entry
def main(argv=None) -> Path:
    p = ArgumentParser(prog="python -m qrlora.export", description=export.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a QR-LoRA adapter file (pytorch_lora_weights.safetensors)")
    p.add_argument("output", help="the LoRA file to write")
    p.add_argument("--format", choices=export.FORMATS, default="diffusers",
                   help="diffusers: diffusers / PEFT layout (default); kohya: ComfyUI, A1111/Forge, kohya sd-scripts")
    p.add_argument("--backbone", choices=list(BACKBONES),
                   help="the adapter's model family, for --format kohya on files without metadata")
    p.add_argument("--overwrite", action="store_true")
    return export.export_file(p.parse_args(argv))
