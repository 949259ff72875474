"""``python -m qrlora.ui`` / ``qrlora-ui``: serve the merge explorer (a gradio page) on this machine."""
from __future__ import annotations

from ..errors import UserError, cli_entry
from .arguments import ArgumentParser


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m qrlora.ui", description="Serve the merge explorer: pick a content and a style "
                       "adapter, merge and render them in the browser, with the command that reproduces the page.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 serves every network interface (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--roots", nargs="+", default=["."],
                   help="folders whose exps_*/ subfolders hold the runs offered on the page (default: .)")
    p.add_argument("--tiny_dir", help="folder the tiny pipelines are built into when chosen on the page "
                   "(default: a new temporary folder)")
    return p


@cli_entry
def main(argv=None) -> None:
    """Serve until Ctrl-C."""
    args = parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        from ..ui.app import serve
    except ModuleNotFoundError as err:
        raise UserError(f"the merge explorer needs {err.name}: pip install --no-deps -r requirements-ui.txt") from None
    serve(args.roots, args.host, args.port, args.tiny_dir)
