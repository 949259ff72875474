"""``python -m qrlora.runs`` / ``qrlora-runs``: find the training runs the wrappers wrote (``qrlora.files.runs``)."""
from __future__ import annotations

import argparse

from ..files import runs
from ..errors import cli_entry
from .arguments import ArgumentParser


@cli_entry
def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m qrlora.runs", description=runs.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pair", "latest", "model"],
                   help="pair: newest style + content run; latest: newest run; model: the base model --adapter recorded")
    p.add_argument("--adapter", help="for `model`: an adapter file")
    p.add_argument("--roots", nargs="+", default=["."], help="folders whose exps_* subfolders hold runs")
    p.add_argument("--backbone")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], help="comma list of methods to accept")
    p.add_argument("--static", action="store_true", help="only methods that fold into weights (not moe)")
    p.add_argument("--hint", default="", help="what to tell the user to set when nothing is found")
    args = p.parse_args(argv)
    if args.what == "model" and not args.adapter:
        p.error("model needs --adapter FILE")
    runs.print_found(args)
