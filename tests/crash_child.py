"""Run the trainer and SIGKILL it at a chosen moment: ``QRLORA_CRASH_AT=KIND:N`` kills at the N-th event of KIND.

Kinds: ``write`` (a file written by ``torch.save``, safetensors or ``Path.write_text``: the file is cut to half
its size first, as a write interrupted midway would leave it), ``rename`` (just after an ``os.replace``) and
``step`` (just after an optimizer update). Used by tests/test_crash.py; the trainer itself has no crash hooks.

    QRLORA_CRASH_AT=write:3 python tests/crash_child.py TRAINER_FLAGS...
"""
from __future__ import annotations

import os
import pathlib
import signal
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

KIND, _, COUNT = os.environ.get("QRLORA_CRASH_AT", "").partition(":")
seen = {"write": 0, "rename": 0, "step": 0}


def event(kind: str, path=None) -> None:
    seen[kind] += 1
    if kind != KIND or seen[kind] != int(COUNT):
        return
    if path is not None and os.path.isfile(path):
        os.truncate(path, os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)


def after(original, kind, path_of=lambda *a, **k: None):
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        event(kind, path_of(*args, **kwargs))
        return result

    return wrapped


def install() -> None:
    import qrlora.files.checkpoint

    def file_arg(index):
        def pick(*args, **kwargs):
            value = args[index] if len(args) > index else None
            return value if isinstance(value, (str, os.PathLike)) else None

        return pick

    torch.save = after(torch.save, "write", file_arg(1))
    qrlora.files.checkpoint.save_file = after(qrlora.files.checkpoint.save_file, "write", file_arg(1))
    pathlib.Path.write_text = after(pathlib.Path.write_text, "write", file_arg(0))
    os.replace = after(os.replace, "rename")
    torch.optim.AdamW.step = after(torch.optim.AdamW.step, "step")


if __name__ == "__main__":
    install()
    from qrlora.cli.train import main

    main(sys.argv[1:])
