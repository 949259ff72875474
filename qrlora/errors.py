"""User-facing errors: one clear line naming the file, flag or layer at fault, and a non-zero exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file's contents). CLIs print it as one line, no traceback."""


def cli_entry(main: Callable) -> Callable:
    """Wrap a CLI ``main`` so ``UserError`` (and Ctrl-C) become ``error: ...`` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
