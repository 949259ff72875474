"""``python -m qrlora.compare`` / ``qrlora-compare``: render every merge strategy, score, tabulate (``qrlora.evaluation.compare``)."""
from __future__ import annotations

from pathlib import Path

from ..evaluation.compare import compare
from ..errors import cli_entry
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from .arguments import (ArgumentParser, add_evaluation_arguments, add_render_arguments, add_strategy_options, number_list,
                        settings_from)


@cli_entry
def main(argv=None) -> list[Path]:
    """``python -m qrlora.compare``: render each merge strategy of a content and a style adapter, then score them."""
    p = ArgumentParser(prog="python -m qrlora.compare", description=main.__doc__)
    p.add_argument("--model_path", required=True)
    p.add_argument("--content_lora_path", required=True)
    p.add_argument("--style_lora_path", required=True)
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
    args = p.parse_args(argv)
    return compare(args, settings_from(RenderSettings, args), settings_from(StrategySettings, args))
