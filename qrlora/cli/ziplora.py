"""``python -m qrlora.ziplora`` / ``qrlora-ziplora``: learn ZipLoRA coefficients, write one adapter file."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import cli_entry
from ..ziplora import learn_and_save
from .arguments import ArgumentParser, add_render_arguments, add_ziplora_arguments


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qrlora.ziplora", description=main.__doc__)
    p.add_argument("--model_path", required=True)
    p.add_argument("--content_lora_path", required=True)
    p.add_argument("--style_lora_path", required=True)
    p.add_argument("--output", required=True, help="adapter file to write (plain lora layout)")
    add_ziplora_arguments(p)
    add_render_arguments(p)
    return p


@cli_entry
def main(argv=None) -> Path:
    """``python -m qrlora.ziplora``: learn ZipLoRA coefficients for a content and a style adapter; write one adapter file."""
    return learn_and_save(build_parser().parse_args(argv))
