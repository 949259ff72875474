"""User-facing errors: one clear line naming the file, flag or layer at fault, and a non-zero exit."""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (a path, a flag, a file's contents). CLIs print it as one line, no traceback."""


class EveryRankError(UserError):
    """A ``UserError`` every process of a multi-process launch raises alike (a launch setting all of them read):
    printed by rank 0 alone, so the user reads it once, not once per process; every rank exits non-zero."""


#: Seconds a rank other than 0 waits, silent, before its exit: rank 0 says the line first, then the launcher stops
#: the rest (an earlier exit of rank 1 would get rank 0 terminated before it printed anything).
QUIET_RANK_WAIT_S = 10.0


def launch_rank() -> int:
    """This process's rank in a launch (``RANK``, else ``LOCAL_RANK``; 0 when not launched by a launcher)."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


SEED_MAX = 2**32 - 1  # numpy's and torch's generators take seeds in [0, 2**32 - 1]


def seed_problem(flag: str, value) -> str | None:
    """Why ``value`` cannot be the seed ``flag`` (a message naming it), or None: an integer in [0, 2**32 - 1]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        return f"{flag} must be an integer in [0, {SEED_MAX}], got {value!r}"
    return None


def describe_os_error(err: OSError) -> str:
    """One line naming the path an ``OSError`` is about: ``out/grid.png: No space left on device``."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    reason = err.strerror or str(err) or type(err).__name__
    return f"{paths}: {reason}" if paths else reason


def cli_entry(main: Callable) -> Callable:
    """Wrap a CLI ``main`` so ``UserError``, OS errors (full disk, read-only folder, a file where a folder should
    be) and Ctrl-C become one ``error: ...`` line on stderr and a non-zero exit status; third-party messages a user
    cannot act on are silenced first (``qrlora.quiet``)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from . import quiet  # here, not at import: only a command changes third-party logging

        quiet.install()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if isinstance(err, EveryRankError) and launch_rank() != 0:
                time.sleep(QUIET_RANK_WAIT_S)  # rank 0 prints it; the launcher ends this process meanwhile
                raise SystemExit(2) from None
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
