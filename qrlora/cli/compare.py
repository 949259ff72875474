"""``python -m qrlora.compare`` / ``qrlora-compare``: render every merge strategy, score, tabulate (``qrlora.evaluation.compare``)."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from ..evaluation.compare import check_scoring_models, parse_seeds, parse_strategies, render_strategy
from ..evaluation.evaluate import ScoringSettings, check_output_dir, evaluate_folders, load_references
from ..files.checkpoint import load_adapter
from ..merging.inference import parse_weights
from ..merging.strategies import check_strategy
from ..errors import UserError, cli_entry
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from .arguments import (ArgumentParser, add_evaluation_arguments, add_render_arguments, add_strategy_options, number_list,
                        settings_from)


def compare(args: argparse.Namespace) -> list[Path]:
    """The command's work: render each merge strategy of a content and a style adapter, then score them."""
    render, settings = settings_from(RenderSettings, args), settings_from(StrategySettings, args)
    scoring = settings_from(ScoringSettings, args)
    # 1. Check everything before the first render.
    strategies = parse_strategies(args.strategies)
    style_weights = parse_weights(args.style_weights, "--style_weights")
    content_weights = parse_weights(args.content_weights, "--content_weights")
    seeds = parse_seeds(args.seeds)
    adapters = [load_adapter(args.style_lora_path), load_adapter(args.content_lora_path)]
    for name in strategies:
        check_strategy(name, adapters, None)
    load_references(args.content_refs, "--content_refs")
    load_references(args.style_refs, "--style_refs")
    check_scoring_models(scoring)
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite)
    taken = [name for name in strategies if (out / name).exists() and any((out / name).iterdir())]
    if taken and not args.overwrite:
        raise UserError(f"--output_dir: {out / taken[0]} is not empty; pass --overwrite or choose a new folder")

    # 2. Render each strategy, 3. score all images together.
    render = replace(render, seed=seeds[0])  # ZipLoRA samples its recordings with the first seed
    for name in strategies:
        render_strategy(name, adapters, args.model_path, render, settings, style_weights, content_weights, seeds,
                        out / name)
    written = evaluate_folders([str(out / name) for name in strategies], scoring, out)
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return written


@cli_entry
def main(argv=None) -> list[Path]:
    """``python -m qrlora.compare``: render each merge strategy of a content and a style adapter, then score them."""
    p = ArgumentParser(prog="python -m qrlora.compare", description=main.__doc__)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id of the base model")
    p.add_argument("--content_lora_path", required=True, help="the content adapter file")
    p.add_argument("--style_lora_path", required=True, help="the style adapter file")
    p.add_argument("--content_refs", required=True, help="folder of content reference images (DINO)")
    p.add_argument("--style_refs", required=True, help="folder of style reference images (CLIP-I)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="comma list of merge strategies to compare")
    p.add_argument("--style_weights", type=number_list, default="1.0", help="comma list")
    p.add_argument("--content_weights", type=number_list, default="1.0", help="comma list")
    p.add_argument("--seeds", default="0", help="comma list; several seeds give each cell a standard error")
    add_strategy_options(p)
    add_evaluation_arguments(p)
    add_render_arguments(p)
    p.set_defaults(output_dir="compare_output")
    return compare(p.parse_args(argv))
