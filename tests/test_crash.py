"""Crash harness: kill the trainer at chosen and random moments, resume with ``latest``, get the same adapter.

A trial SIGKILLs a training run (tests/crash_child.py) inside a checkpoint's file writes, just after a rename,
or after an optimizer step; checks every ``checkpoint-N`` left behind is complete; resumes with
``--resume_from_checkpoint latest`` (repeatedly, until the run finishes) and asserts the final adapter is
bit-identical to an uninterrupted run. CI runs three fixed kill points (~25 s each on 2 cores);
``QRLORA_CRASH_ALL=1`` runs every fixed one, ``QRLORA_CRASH_TRIALS=N`` adds N random ones (``QRLORA_CRASH_SEED``
picks them).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO
from qrlora.files.checkpoint import ADAPTER_FILENAME
from qrlora.files.run_folder import CHECKPOINT_MARKER, list_checkpoints

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`

STEPS = 4
# Events of one run (checkpointing every step, none at the last): 5 file writes per checkpoint (adapter,
# optimizer, scheduler, RNG state, completion marker), 2 renames per checkpoint, one per update.
FIXED = ["write:2", "write:9", "rename:2", "write:1", "write:5", "rename:3", "step:3"]
CI_TRIALS = 3  # inside the optimizer file of checkpoint-1, inside the RNG file of checkpoint-2, published not pruned


def trainer_flags(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
            "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", str(STEPS),
            "--output_dir", str(out), "--lora_init_method", "triu_deltaR", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "2", "--random_flip", "--seed", "3", *extra]


def run_child(flags, crash_at=""):
    env = {**os.environ, "QRLORA_CRASH_AT": crash_at, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tests" / "crash_child.py"), *flags], cwd=REPO, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tiny_sd3, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_child(trainer_flags(tiny_sd3, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / ADAPTER_FILENAME))


def crash_then_resume(model, out, crash_at):
    killed = run_child(trainer_flags(model, out), crash_at)
    assert killed.returncode == -signal.SIGKILL, f"{crash_at} did not kill the run:\n{killed.stderr[-3000:]}"
    for folder in list_checkpoints(out):
        assert (folder / CHECKPOINT_MARKER).is_file(), f"{crash_at}: {folder.name} left incomplete"
    resumed = run_child(trainer_flags(model, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, f"{crash_at}: resume failed\n{resumed.stderr[-3000:]}"
    assert "--resume_from_checkpoint latest:" in resumed.stderr
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, f"{crash_at}: temporary files left: {leftovers}"
    return load_file(str(out / ADAPTER_FILENAME))


def assert_identical(final, reference, crash_at):
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        assert (final[key] == value).all(), f"{crash_at}: {key} differs from the uninterrupted run"


def trials():
    extra = int(os.environ.get("QRLORA_CRASH_TRIALS", "0"))
    rng = random.Random(int(os.environ.get("QRLORA_CRASH_SEED", "0")))
    kinds = {"write": 5 * (STEPS - 1), "rename": 2 * (STEPS - 1), "step": STEPS}
    chosen = [f"{kind}:{rng.randint(1, kinds[kind])}" for kind in rng.choices(list(kinds), weights=kinds.values(), k=extra)]
    return (FIXED if os.environ.get("QRLORA_CRASH_ALL") else FIXED[:CI_TRIALS]) + chosen


@pytest.mark.parametrize("crash_at", trials())
def test_killed_run_resumes_bit_identical(tiny_sd3, tmp_path, reference, crash_at):
    assert_identical(crash_then_resume(tiny_sd3, tmp_path / "run", crash_at), reference, crash_at)
