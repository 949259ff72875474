"""``python -m qrlora.runs`` / ``qrlora-runs``: find the training runs the wrappers wrote (``qrlora.files.runs``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..files import runs
from ..files.checkpoint import read_safetensors
from ..errors import UserError, cli_entry
from .arguments import ArgumentParser


def print_found(args) -> None:
    """The command's work: print the shell assignments of what ``args.what`` asks."""
    if args.what == "model":
        _, meta = read_safetensors(args.adapter)
        if not meta.get("base_model"):
            raise UserError(f"{args.adapter}: the file does not record its base model; {args.hint or 'set MODEL_NAME'}")
        print(runs._assign("FOUND_MODEL", runs._base_model(meta["base_model"], Path(args.adapter).resolve().parent)))
        return
    roots = list(dict.fromkeys(str(Path(r).resolve()) for r in args.roots if Path(r).is_dir()))
    found = runs._filtered(runs.find_runs(roots), args.backbone, args.methods, args.static)
    where = runs._where(roots, args.backbone, args.methods, args.static)
    if args.what == "pair":
        pair = runs.newest_pair(found)
        if pair is None:
            raise UserError(f"no finished style + content pair of the same backbone, method and rank among the {where}; "
                            f"{args.hint or 'train both first'}")
        style, content = pair
        print(f"style run:   {style.describe()}\ncontent run: {content.describe()}", file=sys.stderr)
        print("\n".join([runs._assign("FOUND_STYLE_LORA", str(style.adapter)), runs._assign("FOUND_CONTENT_LORA", str(content.adapter)),
                         runs._assign("FOUND_MODEL", style.base_model)]))
        return
    if not found:
        raise UserError(f"no finished run among the {where}; {args.hint or 'train one first'}")
    latest = max(found, key=lambda r: (r.task == "style", r.mtime))  # style first: the analyses' default prompt is a style
    print(f"run: {latest.describe()}", file=sys.stderr)
    print("\n".join([runs._assign("FOUND_LORA", str(latest.adapter)), runs._assign("FOUND_MODEL", latest.base_model)]))


@cli_entry
def main(argv=None) -> None:
    p = ArgumentParser(prog="python -m qrlora.runs", description=runs.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pair", "latest", "model"],
                   help="pair: newest style + content run; latest: newest run; model: the base model --adapter recorded")
    p.add_argument("--adapter", help="for `model`: an adapter file (default: none)")
    p.add_argument("--roots", nargs="+", default=["."], help="folders whose exps_* subfolders hold runs")
    p.add_argument("--backbone", help="accept only runs of this backbone (default: any)")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], help="comma list of methods to accept (default: any)")
    p.add_argument("--static", action="store_true", help="only methods that fold into weights (not moe)")
    p.add_argument("--hint", default="", help="what to tell the user to set when nothing is found")
    args = p.parse_args(argv)
    if args.what == "model" and not args.adapter:
        p.error("model needs --adapter FILE")
    print_found(args)
