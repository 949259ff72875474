"""``python -m qrlora.tiny`` / ``qrlora-tiny``: write a tiny seeded random diffusers pipeline (offline)."""
from __future__ import annotations

import pathlib
import time

from ..errors import cli_entry
from ..toy.tiny import BACKBONES, build_tiny_pipeline, holds_pipeline
from .arguments import ArgumentParser


@cli_entry
def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m qrlora.tiny --backbone sd3|flux|sdxl --output DIR [--seed 0]``.

    A DIR in use ends in one ``error:`` line and exit status 2 (the project's one error path), nothing touched.
    """
    parser = ArgumentParser(prog="python -m qrlora.tiny",
                            description="Write a tiny seeded random diffusers pipeline (offline) for tests and demos.")
    parser.add_argument("--backbone", required=True, choices=BACKBONES, help="the model family of the pipeline")
    parser.add_argument("--output", required=True, help="pipeline folder to create (or reuse)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    args = parser.parse_args(argv)

    path = pathlib.Path(args.output).expanduser().absolute()
    if holds_pipeline(path, args.backbone, args.seed):
        print(f"reusing tiny {args.backbone} pipeline (seed {args.seed}) at {path}")
        return
    start = time.perf_counter()
    build_tiny_pipeline(args.backbone, path, seed=args.seed)
    print(f"built tiny {args.backbone} pipeline (seed {args.seed}) at {path} in {time.perf_counter() - start:.1f}s")
