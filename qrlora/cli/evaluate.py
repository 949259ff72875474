"""``python -m qrlora.evaluate`` / ``qrlora-evaluate``: score generated images (``qrlora.evaluation.evaluate``)."""
from __future__ import annotations

from pathlib import Path

from ..errors import cli_entry
from ..evaluation.evaluate import ScoringSettings, check_output_dir, evaluate_folders
from .arguments import ArgumentParser, add_evaluation_arguments, settings_from


@cli_entry
def main(argv=None) -> list[Path]:
    """``python -m qrlora.evaluate``: score folders of generated images against style and content references."""
    p = ArgumentParser(prog="python -m qrlora.evaluate", description=main.__doc__)
    p.add_argument("--images", nargs="+", required=True, help="folders with generated images and a manifest.json")
    p.add_argument("--style_refs", help="folder of style reference images (CLIP-I style score; default: none, no style score)")
    p.add_argument("--content_refs", help="folder of content reference images (DINO content score; default: none, no content score)")
    p.add_argument("--output_dir", default="evaluation_output", help="folder for scores.csv, summary.json / .md and tradeoff.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output_dir")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    add_evaluation_arguments(p)
    args = p.parse_args(argv)
    check_output_dir(args.output_dir, args.overwrite)
    written = evaluate_folders(args.images, settings_from(ScoringSettings, args), args.output_dir)
    print((Path(args.output_dir) / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(p.name for p in written)} to {args.output_dir}")
    return written
