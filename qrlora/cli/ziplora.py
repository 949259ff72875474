"""``python -m qrlora.ziplora`` / ``qrlora-ziplora``: learn ZipLoRA coefficients, write one adapter file."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError, cli_entry
from ..files.checkpoint import load_adapter, save_adapter
from ..merging.inference import MergedPipeline
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.ziplora import learn_with_settings, zipped_adapter
from .arguments import ArgumentParser, add_render_arguments, add_ziplora_arguments, settings_from


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qrlora.ziplora", description=main.__doc__)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id of the base model")
    p.add_argument("--content_lora_path", required=True, help="the content adapter file")
    p.add_argument("--style_lora_path", required=True, help="the style adapter file")
    p.add_argument("--output", required=True, help="adapter file to write (plain lora layout)")
    add_ziplora_arguments(p)
    add_render_arguments(p)
    return p


def learn_and_save(args) -> Path:
    """The command's work: learn the coefficients for a content and a style adapter (``learn_with_settings``) and write
    one adapter file."""
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise UserError(f"--output: {output} exists; pass --overwrite or choose a new name")
    content, style = load_adapter(args.content_lora_path), load_adapter(args.style_lora_path)
    render, settings = settings_from(RenderSettings, args), settings_from(StrategySettings, args)
    merged = MergedPipeline(args.model_path, [content, style], None, render, strategy=None)
    result, provenance = learn_with_settings(merged.pipe, merged.denoiser, content, style, settings, render)
    save_adapter(output, zipped_adapter(content, style, result, provenance))
    print(f"wrote {output}")
    return output


@cli_entry
def main(argv=None) -> Path:
    """``python -m qrlora.ziplora``: learn ZipLoRA coefficients for a content and a style adapter; write one adapter file."""
    return learn_and_save(build_parser().parse_args(argv))
