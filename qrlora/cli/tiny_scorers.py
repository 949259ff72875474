"""``python -m qrlora.tiny_scorers``: tiny random CLIP and DINO models for offline tests (``qrlora.toy.tiny_scorers``)."""
from __future__ import annotations


import torch

from ..toy import tiny_scorers
from ..errors import cli_entry
from .arguments import ArgumentParser


@cli_entry
def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m qrlora.tiny_scorers", description=tiny_scorers.__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder to write the tiny CLIP and DINO models into")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the random models")
    args = p.parse_args(argv)
    with torch.no_grad():
        clip, dino = tiny_scorers.build_tiny_scorers(args.output, args.seed)
    print(f"wrote tiny CLIP to {clip} and tiny DINO to {dino}")
