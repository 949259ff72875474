"""Child processes die with their parent: a worker whose parent was killed (SIGTERM, SIGKILL, a closed terminal)
stops at once instead of living on as an orphan that writes results nobody reads and then blocks forever (issue 30).

Called first thing in every child the project starts (the study's ``--jobs`` workers, the world build's classifier
job). On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG)`` sends the child a signal when its parent exits; on
other systems (or if ``prctl`` is missing) a daemon thread polls the parent's pid once a second. multiprocessing's
resource tracker needs nothing: it exits when the last process holding its pipe (parent or worker) is gone.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> None:
    """Make this process end (``signum``, SIGKILL by default: nothing can catch or delay it) when the process
    ``parent_pid`` that started it exits. Safe to call in any child; a no-op cost beyond one system call."""
    if not (sys.platform.startswith("linux") and _prctl_death_signal(signum)):
        threading.Thread(target=_watch_parent, args=(parent_pid, signum), daemon=True, name="lifeline").start()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os.kill(os.getpid(), signum)


def _prctl_death_signal(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, signum: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signum)
