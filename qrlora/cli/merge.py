"""Merge CLIs: ``python -m qrlora.merge`` / ``qrlora-merge`` (``merge_main``: any adapters, one weight each) and the
published weight-grid scripts / ``qrlora-grid`` (``grid_main``: a style and a content adapter over a weight grid).
The work is ``qrlora.merging.inference.merge_adapters`` and ``qrlora.merging.inference.render_grid``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import cli_entry
from ..merging.inference import merge_adapters, render_grid
from .arguments import ArgumentParser, add_render_arguments, add_strategy_arguments, number_list


def grid_parser(description: str, backbone_default_steps: int = 28) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument("--style_lora_path", required=True)
    p.add_argument("--content_lora_path", required=True)
    p.add_argument("--residual_path", help="residual file: merge in residual form (default: delta form, no file needed)")
    p.add_argument("--style_weights", type=number_list, default="0.0,0.5,1.0", help="comma list")
    p.add_argument("--content_weights", type=number_list, default="0.0,0.5,1.0", help="comma list")
    add_strategy_arguments(p)
    add_render_arguments(p, backbone_default_steps)
    return p


@cli_entry
def grid_main(argv=None, description: str = "Merge a style and a content adapter over a grid of weights.") -> list[Path]:
    """The published inference scripts: render ``inference_s{s:.2f}_c{c:.2f}.png`` for every weight pair + ``grid.png``."""
    return render_grid(grid_parser(description).parse_args(argv))


def merge_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qrlora.merge", description=merge_main.__doc__)
    p.add_argument("--model_path", required=True)
    p.add_argument("--adapters", nargs="+", required=True, help="adapter files (static methods mixed; MoE live)")
    p.add_argument("--weights", type=number_list, help="comma list, one per adapter (default: all 1.0); negative weights work: --weights -1,2")
    p.add_argument("--residual_path", help="merge in residual form (adapters must share Q and R)")
    p.add_argument("--save_merged", help="write the merged denoiser here in the diffusers layout (static adapters only)")
    p.add_argument("--no_render", action="store_true", help="skip rendering the prompt")
    add_strategy_arguments(p)
    add_render_arguments(p)
    return p


@cli_entry
def merge_main(argv=None) -> Path | None:
    """``python -m qrlora.merge``: any adapters, one weight each; render a prompt and/or save the merged denoiser."""
    return merge_adapters(merge_parser().parse_args(argv))

