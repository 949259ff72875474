"""The trainer as ``accelerate launch`` runs it, recording what this process writes (tests/test_fsdp.py).

    accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes 2 tests/fsdp_child.py TRAINER_FLAGS

``QRLORA_TEST_RECORD``: a folder; each process writes ``rank{RANK}.json`` there at exit: every path under
``--output_dir`` it created, opened for writing, renamed or removed (Python's audit events, plus ``torch.save``
and safetensors' ``save_file``, which write from C++ / Rust), and what ``shard_base`` reported.
It also records a checksum of this process's trained adapter parameters at exit (the processes must agree).
``QRLORA_TEST_NO_SHARD=1``: the same launch, claimed by ``fsdp_launch`` (one gloo group) but trained unsharded
through accelerate's own data-parallel path (full replicas, ``accelerator.prepare``): the baseline the sharded run
must equal.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

argv = sys.argv[1:]
watched = str(Path(argv[argv.index("--output_dir") + 1]).resolve())
record = {"rank": int(os.environ.get("RANK", "0")), "writes": [], "shard": None}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def note(kind: str, path) -> None:
    try:
        path = os.path.abspath(os.fsdecode(path))
    except TypeError:  # a file descriptor
        return
    if path == watched or path.startswith(watched + os.sep):
        record["writes"].append([kind, os.path.relpath(path, watched)])


def audit(event: str, args) -> None:
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (mode is None and flags and flags & WRITE_FLAGS):
            note("open", path)
    elif event == "os.mkdir":  # makedirs(exist_ok=True) of a folder that exists (accelerate's, per process): no write
        if not os.path.isdir(os.fsdecode(args[0])):
            note(event, args[0])
    elif event in ("os.rename", "os.remove", "os.rmdir", "os.unlink"):
        note(event, args[0])
        if event == "os.rename":
            note(event, args[1])
    elif event == "shutil.rmtree":
        note(event, args[0])


sys.addaudithook(audit)

import safetensors.torch  # noqa: E402 - patched before qrlora imports save_file by name
import torch  # noqa: E402

_save_file, _torch_save = safetensors.torch.save_file, torch.save


def save_file(tensors, filename, *a, **k):
    note("safetensors", filename)
    return _save_file(tensors, filename, *a, **k)


def torch_save(obj, f, *a, **k):
    if isinstance(f, (str, os.PathLike)):
        note("torch.save", f)
    return _torch_save(obj, f, *a, **k)


safetensors.torch.save_file, torch.save = save_file, torch_save

from qrlora.training import sharding  # noqa: E402 - before qrlora.training.trainer binds shard_base

_fsdp_launch, _shard_base = sharding.fsdp_launch, sharding.shard_base
trained: list = []


def fsdp_launch(args):
    plan = _fsdp_launch(args)
    return None if os.environ.get("QRLORA_TEST_NO_SHARD") == "1" else plan


def shard_base(*a, **k):
    report = _shard_base(*a, **k)
    record["shard"] = {"world": report.world, "units": report.units, "base_params": report.base_params,
                       "local_params": report.local_params}
    return report


sharding.fsdp_launch, sharding.shard_base = fsdp_launch, shard_base


@atexit.register
def _dump() -> None:
    from qrlora.core.layers import adapter_layers

    if trained:
        params = [p for _, layer in adapter_layers(trained[0]) for p in layer.parameters() if p.requires_grad]
        record["adapter_checksum"] = [float(p.double().sum()) for p in params]
    folder = Path(os.environ["QRLORA_TEST_RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{record['rank']}.json").write_text(json.dumps(record))


import accelerate  # noqa: E402

_unwrap = accelerate.Accelerator.unwrap_model


def unwrap_model(self, model, *a, **k):  # the trainer unwraps its prepared denoiser once: keep it for the checksum
    unwrapped = _unwrap(self, model, *a, **k)
    trained.append(unwrapped)
    return unwrapped


accelerate.Accelerator.unwrap_model = unwrap_model

from qrlora.cli.train import main  # noqa: E402

main(argv)
