"""CLI of the CPU world (``python -m qrlora.world`` / ``qrlora-world``): ``build --output DIR`` and ``experiment``
(README.md, "The CPU world")."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..errors import UserError, cli_entry
from . import data

EXPERIMENT_STEPS = 100  # trainer steps per adapter (a sweep on the shipped world: README "The CPU world")
EXPERIMENT_LR = 1e-2


def _positive(flag: str, value: int) -> None:
    if value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qrlora.world", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the world's VAE, denoiser and classifier from scratch (seeded)")
    b.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--vae_steps", type=int, default=1200)
    b.add_argument("--denoiser_steps", type=int, default=4000)
    b.add_argument("--classifier_steps", type=int, default=800)
    b.add_argument("--width", type=int, default=128, help="transformer width (a multiple of 32)")
    b.add_argument("--layers", type=int, default=4, help="transformer joint blocks")
    b.add_argument("--batch_size", type=int, default=64)
    b.add_argument("--learning_rate", type=float, default=1e-3)
    b.add_argument("--threads", type=int, default=1, help="torch threads per process (the classifier trains in a second one)")
    b.add_argument("--samples_per_pair", type=int, default=4, help="base-model samples per seen (shape, style) pair")
    e = sub.add_parser("experiment", help="content + style adapters per method, merged per strategy, scored by the classifier")
    e.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    e.add_argument("--output", required=True, help="folder for the runs and results.json / .md / .png (must not exist or be empty)")
    e.add_argument("--methods", default="all", help="comma list of --lora_init_method names, or 'all' (default)")
    e.add_argument("--merges", default="all", help="comma list of merge strategies (direct, ziplora, klora), or 'all' (default)")
    e.add_argument("--weights", default="0.5,1.0", help="comma list: the grid is every (content, style) pair of these (default 0.5,1.0)")
    e.add_argument("--samples", type=int, default=32, help="images per cell, seeds 0..N-1 (default 32)")
    e.add_argument("--steps", type=int, default=EXPERIMENT_STEPS, help=f"trainer steps per adapter (default {EXPERIMENT_STEPS})")
    e.add_argument("--learning_rate", type=float, default=EXPERIMENT_LR, help=f"trainer learning rate (default {EXPERIMENT_LR}; x10 for ica)")
    e.add_argument("--rank", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("images", help="render training images of one (shape, style) pair as PNGs (adapter data)")
    i.add_argument("--shape", required=True, choices=data.SHAPES)
    i.add_argument("--style", required=True, choices=data.STYLES)
    i.add_argument("--count", type=int, default=4)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--output", required=True, help="folder to write into (created)")
    c = sub.add_parser("score", help="classify the PNG images of a folder (shape, style) with a world's classifier")
    c.add_argument("folder", help="folder of .png images (e.g. a merge grid's output)")
    c.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    c.add_argument("--glob", default="*.png", help="which files of the folder (default: *.png)")
    args = parser.parse_args(argv)
    command = "python -m qrlora.world " + shlex.join(sys.argv[1:] if argv is None else argv)

    if args.command == "build":
        from .build import build_world

        for flag in ("vae_steps", "denoiser_steps", "classifier_steps", "layers", "batch_size", "threads", "samples_per_pair"):
            _positive(f"--{flag}", getattr(args, flag))
        if args.width <= 0 or args.width % 32:
            raise UserError(f"--width must be a positive multiple of 32, got {args.width}")
        if args.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
        start = time.perf_counter()
        record = build_world(args.output, seed=args.seed, vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps,
                             classifier_steps=args.classifier_steps, width=args.width, layers=args.layers,
                             batch_size=args.batch_size, lr=args.learning_rate, threads=args.threads,
                             samples_per_pair=args.samples_per_pair, command=command)
        c, m = record["classifier"], record["base_model"]
        print(f"built the world at {args.output} in {(time.perf_counter() - start) / 60:.1f} min: "
              f"classifier shape {c['shape_accuracy']:.1%} style {c['style_accuracy']:.1%}; "
              f"base model seen shape {m['seen_shape_accuracy']:.1%} style {m['seen_style_accuracy']:.1%}")

    elif args.command == "experiment":
        _experiment(args, command)
    elif args.command == "score":
        _score(args)
    elif args.command == "images":
        from .world import write_instance_images

        _positive("--count", args.count)
        folder = write_instance_images(args.output, args.shape, args.style, count=args.count, seed=args.seed)
        print(f"wrote {args.count} images of {data.caption(args.shape, args.style)!r} to {folder}")


def _score(args) -> None:
    """Print ``file: shape, style`` for every image of the folder matching ``--glob`` (sorted by name)."""
    from pathlib import Path

    from PIL import Image

    from .world import SHIPPED_WORLD, load_world

    files = sorted(Path(args.folder).glob(args.glob)) if Path(args.folder).is_dir() else []
    if not files:
        raise UserError(f"{args.folder}: no images matching {args.glob} to score")
    world = load_world(args.world or SHIPPED_WORLD)
    shapes, styles = world.classify([Image.open(f) for f in files])
    for f, shape, style in zip(files, shapes, styles):
        print(f"{f.name}: {shape}, {style}")


def _experiment(args, command: str) -> None:
    """Check every flag, then run ``qrlora.world.experiment.run_experiment`` and print the table."""
    from pathlib import Path

    from .experiment import METHOD_NAMES, check_choices, run_experiment
    from .world import SHIPPED_WORLD, load_world
    from ..strategies import STRATEGIES

    methods = METHOD_NAMES if args.methods == "all" else check_choices("--methods", args.methods.split(","), METHOD_NAMES)
    merges = list(STRATEGIES) if args.merges == "all" else check_choices("--merges", args.merges.split(","), list(STRATEGIES))
    try:
        grid = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UserError(f"--weights: expected a comma list of numbers, got {args.weights!r}") from None
    for flag in ("samples", "steps", "rank"):
        _positive(f"--{flag}", getattr(args, flag))
    if args.learning_rate <= 0:
        raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output: {output} exists and is not an empty folder; choose a new one")
    world = load_world(args.world or SHIPPED_WORLD)
    start = time.perf_counter()
    results = run_experiment(world, output, methods=methods, merges=merges, grid=grid, samples=args.samples,
                             steps=args.steps, lr=args.learning_rate, rank=args.rank, seed=args.seed, command=command)
    print((output / "results.md").read_text())
    print(f"experiment done in {(time.perf_counter() - start) / 60:.1f} min: {output / 'results.json'}")
    return results
