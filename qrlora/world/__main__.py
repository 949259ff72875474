"""CLI of the CPU world: ``python -m qrlora.world build --output DIR`` and ``... experiment`` (see README.md)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

from ..errors import UserError, cli_entry


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
    args = parser.parse_args(argv)

    if args.command == "build":
        from .build import build_world

        for flag in ("vae_steps", "denoiser_steps", "classifier_steps", "layers", "batch_size", "threads", "samples_per_pair"):
            _positive(f"--{flag}", getattr(args, flag))
        if args.width <= 0 or args.width % 32:
            raise UserError(f"--width must be a positive multiple of 32, got {args.width}")
        if args.learning_rate <= 0:
            raise UserError(f"--learning_rate must be positive, got {args.learning_rate}")
        command = "python -m qrlora.world " + shlex.join(sys.argv[1:] if argv is None else argv)
        start = time.perf_counter()
        record = build_world(args.output, seed=args.seed, vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps,
                             classifier_steps=args.classifier_steps, width=args.width, layers=args.layers,
                             batch_size=args.batch_size, lr=args.learning_rate, threads=args.threads,
                             samples_per_pair=args.samples_per_pair, command=command)
        c, m = record["classifier"], record["base_model"]
        print(f"built the world at {args.output} in {(time.perf_counter() - start) / 60:.1f} min: "
              f"classifier shape {c['shape_accuracy']:.1%} style {c['style_accuracy']:.1%}; "
              f"base model seen shape {m['seen_shape_accuracy']:.1%} style {m['seen_style_accuracy']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
