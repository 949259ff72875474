"""Hostile input (issue 30): every case of the sweep that was not clean, and the class each stands for.

Each case gives one line naming the file, flag or layer at fault and a non-zero exit (or recomputes what it can),
never a traceback, a silent wrong result, a hang or lost data. The fast cases run in the quick subset."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import error_lines, load_denoiser, make_adapter, one_error
from qrlora.cli.merge import merge_main
from qrlora.files.checkpoint import load_adapter

RENDER = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def sd3_pair(tiny_sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_pair")
    return (make_adapter(tiny_sd3, "sd3", root / "a.safetensors", seed=1),
            make_adapter(tiny_sd3, "sd3", root / "b.safetensors", method="lora", seed=2))


# ---- 1. a saved TIES / DARE merge is the strategy's merge, not the plain sum ---------------------------------
@pytest.mark.parametrize("strategy", ["ties", "dare"])
def test_saved_ties_dare_merge_is_the_strategys_merge(strategy, tiny_sd3, sd3_pair, tmp_path):
    import diffusers
    from peft.utils.merge_utils import dare_linear, ties

    from qrlora.core.decompose import layer_seed

    merge_main(["--model_path", str(tiny_sd3), "--adapters", *map(str, sd3_pair), "--weights", "1,0.5",
                "--merge_strategy", strategy, "--merge_density", "0.1", "--save_merged", str(tmp_path / "m"),
                "--no_render", "--device", "cpu"])
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "m")
    base = load_denoiser(tiny_sd3, "sd3")
    dWs = [load_adapter(a).delta_weights() for a in sd3_pair]
    weights = torch.tensor([1.0, 0.5])
    checked = 0
    for p in dWs[0]:
        if p not in dWs[1]:
            continue
        deltas = [dWs[0][p], dWs[1][p]]
        if strategy == "ties":
            expected = ties(deltas, weights, 0.1, majority_sign_method="total")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(layer_seed(0, p))
                expected = dare_linear(deltas, weights, 0.1)
        got = merged.get_submodule(p).weight - base.get_submodule(p).weight
        plain = deltas[0] + 0.5 * deltas[1]
        assert torch.allclose(got, expected, atol=1e-5), p
        assert not torch.allclose(got, plain, atol=1e-3), p  # the bug: the saved file was the plain sum
        checked += 1
    assert checked


@pytest.mark.parametrize("strategy", ["ties", "dare"])
@pytest.mark.parametrize("save", [False, True])
def test_moe_adapter_with_ties_or_dare_is_refused_on_render_and_save(strategy, save, tiny_sd3, sd3_pair, tmp_path,
                                                                      capsys):
    moe = make_adapter(tiny_sd3, "sd3", tmp_path / "moe.safetensors", method="moe", rank=4, num_experts=2)
    flags = ["--model_path", str(tiny_sd3), "--adapters", str(sd3_pair[0]), str(moe), "--merge_strategy", strategy,
             *RENDER, "--output_dir", str(tmp_path / "out")]
    if save:
        flags += ["--save_merged", str(tmp_path / "m"), "--no_render"]
    line = one_error(capsys, lambda: merge_main(flags))
    assert "moe.safetensors" in line and f"--merge_strategy {strategy}" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


# ---- 2. one writer per study folder; 6. paths relative to it; 9. damaged study files -------------------------
def _hold_study_lock(folder):
    """Another process holding the study lock (a study running there)."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, time; from qrlora.cli.world_study import StudyLock; StudyLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_study_on_one_folder_is_refused_and_touches_nothing(tmp_path, capsys):
    from qrlora.cli.world import main

    out = tmp_path / "study"
    pair = out / "pairs" / "triu_deltaR-x" / "seed0" / "content"
    pair.mkdir(parents=True)
    (pair / "pytorch_lora_weights.safetensors").write_bytes(b"being written")  # no pair.json yet
    holder = _hold_study_lock(out)
    try:
        line = one_error(capsys, lambda: main(["study", "--output", str(out), "--conditions", "triu_deltaR",
                                               "--seeds", "0", "--samples", "1", "--jobs", "1"]))
    finally:
        holder.kill()
        holder.wait()
    assert str(out) in line and "in use by another study" in line
    assert (pair / "pytorch_lora_weights.safetensors").read_bytes() == b"being written"


def test_pair_folder_with_a_live_training_run_is_never_deleted(tmp_path, capsys):
    """The pair trainer deletes an interrupted pair folder only when no training run holds it."""
    import subprocess
    import sys

    from conftest import REPO
    from qrlora.cli.world_study import train_pair
    from qrlora.errors import UserError
    from qrlora.toy.world.study import CONDITIONS, pair_folder_name
    from qrlora.toy.world.world import SHIPPED_WORLD

    run = tmp_path / "pairs" / pair_folder_name(CONDITIONS["triu_deltaR"], 0) / "content" / "run"
    run.mkdir(parents=True)
    code = ("import sys, time; from qrlora.files.run_folder import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another training run"):
            train_pair(str(SHIPPED_WORLD), "triu_deltaR", 0, str(tmp_path), steps=1)
    finally:
        holder.kill()
        holder.wait()
    assert run.is_dir()


def _fake_pair(output, name="triu_deltaR", seed=0):
    from qrlora.toy.world.study import CONDITIONS, pair_folder_name

    folder = output / "pairs" / pair_folder_name(CONDITIONS[name], seed)
    for role in ("content", "style"):
        (folder / role / "run").mkdir(parents=True)
        (folder / role / "run" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    return folder


@pytest.mark.parametrize("damage", ["", "{", "null", "[]", '{"paths": 3}', '{"paths": {"content": "a"}}'])
def test_damaged_pair_record_is_said_and_the_pair_retrained(damage, tmp_path, caplog):
    from qrlora.cli.world_study import read_pair

    folder = _fake_pair(tmp_path)
    (folder / "pair.json").write_text(damage)
    assert read_pair(folder, tmp_path) is None
    assert [r.getMessage() for r in caplog.records if "pair.json" in r.getMessage()][0].startswith(str(folder))


def test_pair_record_paths_are_relative_so_a_copied_study_reads_its_own(tmp_path):
    import json
    import shutil

    from qrlora.cli.world_study import read_pair

    original = tmp_path / "a"
    folder = _fake_pair(original)
    rel = folder.relative_to(original)
    (folder / "pair.json").write_text(json.dumps({
        "paths": {r: str(rel / r / "run" / "pytorch_lora_weights.safetensors") for r in ("content", "style")},
        "seeds": {"content": 0, "style": 100}, "seconds": 1.0}))
    shutil.copytree(original, tmp_path / "b")
    copied = read_pair(tmp_path / "b" / rel, tmp_path / "b")
    assert all(p.startswith(str(tmp_path / "b")) for p in copied["paths"].values())
    # An older record with absolute paths is re-rooted at its pairs/ part, never read from the original.
    (tmp_path / "b" / rel / "pair.json").write_text(json.dumps({
        "paths": {r: str(folder / r / "run" / "pytorch_lora_weights.safetensors") for r in ("content", "style")},
        "seeds": {"content": 0, "style": 100}, "seconds": 1.0}))
    shutil.rmtree(original)  # moved: the original is gone
    moved = read_pair(tmp_path / "b" / rel, tmp_path / "b")
    assert all(p.startswith(str(tmp_path / "b")) for p in moved["paths"].values())


GOOD_CELL = {"condition": "triu_deltaR", "seed": 0, "samples": 2, "pair_seeds": {"content": 0, "style": 100},
             "grid": [{"content_weight": 1.0, "style_weight": 1.0, "content": 1, "style": 2, "both": 1}],
             "own_content": 2, "own_style": 1, "content_alone_merged_prompt": 1, "style_alone_merged_prompt": 0,
             "mechanism": {}, "training_seconds": 1.0, "seconds": 2.0}


@pytest.mark.parametrize("damage", ["", '{"grid": [', "null", "[]", "3", "grid_empty", "grid_other", "count_str",
                                    "samples_other", "missing_key"])
def test_damaged_cell_is_detected_and_recomputed(damage, tmp_path, caplog):
    import json

    from qrlora.cli.world_study import read_cell

    cell = json.loads(json.dumps(GOOD_CELL))
    if damage == "grid_empty":
        cell["grid"] = []
    elif damage == "grid_other":
        cell["grid"][0]["style_weight"] = 0.5
    elif damage == "count_str":
        cell["grid"][0]["both"] = "1"
    elif damage == "samples_other":
        cell["samples"] = 3
    elif damage == "missing_key":
        del cell["own_style"]
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(cell) if damage in ("grid_empty", "grid_other", "count_str", "samples_other",
                                                    "missing_key") else damage)
    assert read_cell(path, "triu_deltaR", 0, 2, (1.0,)) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(str(path)) and "computing this cell again" in said[0]
    path.write_text(json.dumps(GOOD_CELL))
    assert read_cell(path, "triu_deltaR", 0, 2, (1.0,)) == GOOD_CELL


@pytest.mark.parametrize("damage", ["", "{", "null", "[]"])
def test_damaged_study_record_is_one_line(damage, tmp_path, capsys):
    from qrlora.cli.world import main

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(damage)
    line = one_error(capsys, lambda: main(["study", "--output", str(out), "--conditions", "triu_deltaR",
                                           "--seeds", "0", "--samples", "1", "--jobs", "1"]))
    assert str(out / "study.json") in line and "damaged" in line
    assert (out / "study.json").read_text() == damage and not (out / ".qrlora-study.lock").exists()


def test_report_name_is_confined_to_the_output(tmp_path, capsys):
    from qrlora.cli.world import main

    for name in ("../../x", "a/b", "..", ".hidden"):
        line = one_error(capsys, lambda: main(["study", "--output", str(tmp_path / "s"), "--report_name", name]))
        assert "--report_name" in line
    assert not (tmp_path / "s").exists()


# ---- 9. numbers a user passes: range-checked by the parser, once -------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "4294967296", "1.5"])
def test_seeds_out_of_range_are_refused_by_the_parser(value, tiny_sd3, sd3_pair, tmp_path, capsys):
    from conftest import REPO
    from qrlora.cli.train import main as train_main
    from qrlora.cli.world import main as world_main

    line = one_error(capsys, lambda: world_main(["study", "--output", str(tmp_path / "s"), "--seeds", f"0,{value}"]))
    assert "--seeds" in line
    line = one_error(capsys, lambda: train_main(["--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir",
                                                 str(REPO / "assets/cnt/cat"), "--instance_prompt", "a <c> cat",
                                                 "--output_dir", str(tmp_path / "run"), "--seed", value]))
    assert "--seed" in line
    line = one_error(capsys, lambda: merge_main(["--model_path", str(tiny_sd3), "--adapters", str(sd3_pair[0]),
                                                 *RENDER, "--output_dir", str(tmp_path / "o"), "--seed", value]))
    assert "--seed" in line
    assert not any((tmp_path / d).exists() for d in ("s", "run", "o"))


def test_seed_range_is_checked_in_typed_settings_too():
    from qrlora.errors import UserError
    from qrlora.merging.settings import RenderSettings

    with pytest.raises(UserError, match="--seed"):
        RenderSettings(seed=2**32)
    assert RenderSettings(seed=2**32 - 1).seed == 2**32 - 1


# ---- 2. two real studies on one folder; 3. a killed study leaves no orphans -----------------------------------
def _study_command(out, *extra):
    import sys

    return [sys.executable, "-m", "qrlora.world", "study", "--output", str(out), "--conditions", "triu_deltaR",
            "--seeds", "0", "--samples", "1", *extra]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc: children first, then theirs)."""
    from pathlib import Path

    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_study_processes_on_one_output(tmp_path):
    import subprocess
    import time

    from conftest import REPO, error_lines

    out = tmp_path / "study"
    first = subprocess.Popen(_study_command(out, "--jobs", "1"), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".qrlora-study.lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(_study_command(out, "--jobs", "1"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    lines = error_lines(second.stderr)
    assert len(lines) == 1 and str(out) in lines[0] and "in use by another study" in lines[0]
    first.kill()  # the first need not finish: what matters is that its work is never deleted by the second
    first.wait()
    assert (out / "study.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_killed_study_leaves_no_orphan_workers(signum, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from conftest import REPO

    out = tmp_path / "study"
    parent = subprocess.Popen(_study_command(out, "--jobs", "2", "--conditions", "triu_deltaR,lora"), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, children = time.time() + 180, set()
    while time.time() < deadline and parent.poll() is None:
        children = _descendants(parent.pid)
        if len(children) >= 3:  # the resource tracker and two workers
            break
        time.sleep(0.5)
    assert len(children) >= 3, "the study started no workers"
    time.sleep(3)  # the workers are importing torch / training
    children = _descendants(parent.pid)
    os.kill(parent.pid, getattr(signal, signum))
    parent.wait(timeout=60)
    deadline = time.time() + 30
    while any(_alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:  # do not leave them to the machine if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} of {len(children)} child processes outlived the study"
    assert not (out / "cells").exists()


# ---- 4. the cache's file-hash memo is keyed on content; damaged memos; read-only caches -------------------------
@pytest.fixture
def model_files(tmp_path, monkeypatch):
    """A model folder with a large-ish safetensors file and a small config, every file memoised (threshold 0)."""
    from safetensors.torch import save_file

    from qrlora.training import cache

    monkeypatch.setattr(cache, "MEMO_MIN_BYTES", 0)
    root = tmp_path / "model"
    (root / "vae").mkdir(parents=True)
    save_file({"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(0))},
              root / "vae" / "diffusion_pytorch_model.safetensors")
    (root / "vae" / "config.json").write_text('{"a": 1}')
    return root


def test_replaced_file_with_the_old_size_and_mtime_is_a_new_fingerprint(model_files, tmp_path):
    import os

    from safetensors.torch import save_file

    from qrlora.training.cache import DiskCache

    weights = model_files / "vae" / "diffusion_pytorch_model.safetensors"
    before = DiskCache(tmp_path / "cache").files_fingerprint(model_files, ["vae"])
    stat = weights.stat()
    save_file({"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(1))}, weights)  # retrained VAE
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert DiskCache(tmp_path / "cache").files_fingerprint(model_files, ["vae"]) != before


@pytest.mark.parametrize("damage", ["", "{", "null", "[]", "3", '{"x": [1, 2]}', "short_entries", "wrong_type"])
def test_damaged_memo_is_said_once_and_recomputed(damage, model_files, tmp_path, caplog):
    import json

    from qrlora.training.cache import MEMO_FORMAT, MEMO_VERSION, DiskCache

    clean = DiskCache(tmp_path / "clean").files_fingerprint(model_files, ["vae"])
    memo = tmp_path / "cache" / "file_hashes.json"
    memo.parent.mkdir()
    if damage == "short_entries":
        damage = json.dumps({"format": MEMO_FORMAT, "version": MEMO_VERSION, "hashes": {"a": "12", "b": None}})
    elif damage == "wrong_type":
        damage = json.dumps({"format": MEMO_FORMAT, "version": MEMO_VERSION, "hashes": []})
    memo.write_text(damage)
    with caplog.at_level("WARNING", logger="qrlora.cache"):
        assert DiskCache(tmp_path / "cache").files_fingerprint(model_files, ["vae"]) == clean
    said = [r.getMessage() for r in caplog.records if r.name == "qrlora.cache"]
    assert len(said) == 1 and str(memo) in said[0] and "damaged" in said[0], said
    assert json.loads(memo.read_text())["format"] == MEMO_FORMAT  # rewritten whole


def test_read_only_cache_for_the_same_model_at_a_new_path(model_files, tmp_path, monkeypatch, caplog):
    import shutil

    from qrlora.training import cache

    cache_dir = tmp_path / "cache"
    first = cache.DiskCache(cache_dir).files_fingerprint(model_files, ["vae"])
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(model_files, moved)
    cache_dir.chmod(0o555)
    hashed = []
    monkeypatch.setattr(cache, "_sha256_file", lambda p, real=cache._sha256_file: hashed.append(p) or real(p))
    try:
        with caplog.at_level("WARNING", logger="qrlora.cache"):
            assert cache.DiskCache(cache_dir).files_fingerprint(moved, ["vae"]) == first
    finally:
        cache_dir.chmod(0o755)
    assert not hashed  # every file found in the memo by its content: nothing read whole, nothing written
    assert not [r for r in caplog.records if r.name == "qrlora.cache"]


def test_memo_that_cannot_be_written_is_one_warning_not_an_error(model_files, tmp_path, monkeypatch, caplog):
    import errno
    from contextlib import contextmanager

    from qrlora.training import cache

    @contextmanager
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
        yield

    monkeypatch.setattr(cache, "atomic_output", read_only)
    clean = cache.DiskCache(tmp_path / "clean", write=False).files_fingerprint(model_files, ["vae"])
    with caplog.at_level("WARNING", logger="qrlora.cache"):
        assert cache.DiskCache(tmp_path / "ro").files_fingerprint(model_files, ["vae"]) == clean
    said = [r.getMessage() for r in caplog.records if r.name == "qrlora.cache"]
    assert len(said) == 1 and "cannot update" in said[0] and "Read-only" in said[0]


# ---- 5. wrappers: DRY_RUN spellings, GPU ids the machine does not have, an id twice ------------------------------
def _wrapper(tmp_path, ids, gpus: int | None, **env):
    """Run a training wrapper with a fake ``nvidia-smi`` listing ``gpus`` GPUs (None: no NVIDIA tools at all)."""
    import os
    import subprocess

    from conftest import REPO

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "nvidia-smi"
    fake.unlink(missing_ok=True)
    if gpus is not None:
        fake.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-{i})'\n" for i in range(gpus)))
        fake.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MODEL_NAME": str(tmp_path / "no-model"),
                **env}
    if gpus is None:  # a machine without the driver: nvidia-smi is not on PATH (and /proc/driver/nvidia absent here)
        full_env["PATH"] = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    return subprocess.run(["bash", str(REPO / "SD3_dir/train_deltaR_sty.sh"), ids, "4"], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=60), work


@pytest.mark.parametrize("value", ["1", "true", "yes", "TRUE", "on"])
def test_dry_run_spellings_are_dry(value, tmp_path):
    done, work = _wrapper(tmp_path, "cpu", None, DRY_RUN=value)
    assert done.returncode == 0 and "python" in done.stdout, done.stderr
    assert list(work.iterdir()) == []


def test_dry_run_nonsense_is_refused(tmp_path):
    done, work = _wrapper(tmp_path, "cpu", None, DRY_RUN="maybe")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: DRY_RUN must be 1, true, yes or on (a dry run) or 0, false, no or off, got 'maybe'"]


@pytest.mark.parametrize("gpus", [0])  # nvidia-smi listing none (a driverless machine: the same branch, count 0)
def test_gpu_id_on_a_machine_without_cuda_is_refused(gpus, tmp_path):
    done, work = _wrapper(tmp_path, "0", gpus, DRY_RUN="0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "cpu" in lines[0], lines
    assert list(work.iterdir()) == []
    dry, _ = _wrapper(tmp_path, "0", gpus, DRY_RUN="1")  # a dry run says it in one line and prints the command
    assert dry.returncode == 0 and sum("no CUDA GPU" in line for line in dry.stderr.splitlines()) == 1


def test_gpu_ids_the_machine_has_not_and_twice_are_refused(tmp_path):
    done, _ = _wrapper(tmp_path, "0,2", 2, DRY_RUN="0")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: GPU id 2: this machine has 2 CUDA GPU(s), ids 0 to 1"]
    done, _ = _wrapper(tmp_path, "0,0", 2, DRY_RUN="1")
    assert done.returncode == 2 and "twice" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done, _ = _wrapper(tmp_path, "0,1", 2, DRY_RUN="1")
    assert done.returncode == 0 and "CUDA_VISIBLE_DEVICES=0,1 (2 processes)" in done.stderr
    assert "note:" not in done.stderr


# ---- 7. rank-deficient target weights; 9. NaN / Inf in a base weight ----------------------------------------------
def test_all_zero_or_low_rank_weight_has_an_undefined_gap():
    from qrlora.core.decompose import GAP_RANK_DEFICIENT, truncated_svd

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(48, 2, generator=gen) @ torch.randn(2, 40, generator=gen)  # exactly rank 2
    assert truncated_svd(torch.zeros(48, 40), 4).gap == GAP_RANK_DEFICIENT
    assert truncated_svd(low, 4).gap == GAP_RANK_DEFICIENT
    assert truncated_svd(low, 2).gap > 1e3  # rank 2 at rank 2: the top-2 subspace is the weight's own
    assert truncated_svd(torch.randn(48, 40, generator=gen), 4).gap not in (GAP_RANK_DEFICIENT, float("inf"))
    big_low = torch.randn(1024, 3, generator=gen) @ torch.randn(3, 768, generator=gen)  # the randomized path
    assert truncated_svd(big_low, 8, exact=False).gap == GAP_RANK_DEFICIENT


def _two_layer_model(first: torch.Tensor):
    from torch import nn

    model = nn.Sequential()
    model.add_module("a", nn.Linear(first.shape[1], first.shape[0]))
    model.add_module("b", nn.Linear(first.shape[1], first.shape[0]))
    with torch.no_grad():
        model.a.weight.copy_(first)
    return model


@pytest.mark.parametrize("kind", ["zero", "low_rank"])
def test_rank_deficient_target_is_one_warning_naming_the_layer_and_recorded(kind, caplog):
    from qrlora.core.inject import inject_adapters
    from qrlora.core.methods import AdapterConfig
    from qrlora.files.checkpoint import adapter_from_model

    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(24, 16) if kind == "zero" else torch.randn(24, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    model = _two_layer_model(weight)
    cfg = AdapterConfig(method="triu_deltaR", rank=4)
    with caplog.at_level("WARNING"):
        inject_adapters(model, cfg, ["a", "b"])
    said = [r.getMessage() for r in caplog.records if "rank below" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("layer a:"), [r.getMessage() for r in caplog.records]
    meta = adapter_from_model(model, cfg, {}).metadata
    assert (meta["singular_gap_min"], meta["singular_gap_min_layer"]) == ("0.0", "a")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_base_weight_is_one_line_naming_the_layer(bad):
    from qrlora.core.inject import inject_adapters
    from qrlora.core.methods import AdapterConfig
    from qrlora.errors import UserError

    weight = torch.randn(24, 16)
    weight[3, 5] = bad
    for method in ("triu_deltaR", "lora"):
        with pytest.raises(UserError, match=r"^layer a: its base weight holds 1 NaN or Inf"):
            inject_adapters(_two_layer_model(weight), AdapterConfig(method=method, rank=4), ["a", "b"])


def test_nan_in_a_model_file_stops_training_with_one_line(tiny_sd3, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import REPO
    from qrlora.cli.train import main

    model = tmp_path / "model"
    shutil.copytree(tiny_sd3, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in sorted(tensors) if k.endswith("attn.to_q.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    line = one_error(capsys, lambda: main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir",
                                           str(REPO / "assets/cnt/cat"), "--instance_prompt", "a photo of a <c> cat",
                                           "--resolution", "64", "--max_train_steps", "1", "--max_sequence_length", "16",
                                           "--output_dir", str(tmp_path / "run")]))
    assert name.removesuffix(".weight") in line and "NaN or Inf" in line
    from qrlora.files.run_folder import RunLock

    for lock in list(RunLock._held.values()):  # what the process's exit does (atexit): the lock goes
        lock.release()
    assert not (tmp_path / "run").exists()  # ... and with it the empty run folder the refused run had made


# ---- 8. the truncation message names the part of the prompt that is cut ---------------------------------------
def test_render_with_a_short_t5_length_names_the_words_cut(tiny_sd3, sd3_pair, tmp_path, capfd, caplog):
    from qrlora import quiet

    quiet._said.clear()
    merge_main(["--model_path", str(tiny_sd3), "--adapters", str(sd3_pair[0]), *RENDER, "--max_sequence_length", "4",
                "--prompt", "a photo of a <c> cat in <s> style", "--output_dir", str(tmp_path / "o")])
    err = capfd.readouterr().err
    said = [r.getMessage() for r in caplog.records if "cut" in r.getMessage() or "truncated" in r.getMessage()]
    assert len(said) == 1 and "cat in <s> style" in said[0] and "--prompt" in said[0], said
    assert "['']" not in err and "truncated" not in err  # the pipeline's own line is not repeated


def test_pipeline_truncation_warning_without_the_words_is_never_an_empty_list():
    import logging

    from qrlora import quiet

    quiet._said.clear()
    record = logging.LogRecord("diffusers", logging.WARNING, "", 0, "The following part of your input was truncated "
                               "because `max_sequence_length` is set to  4 tokens: ['']", (), None)
    assert quiet.QuietFilter().filter(record)
    assert "['']" not in record.getMessage() and "4 tokens" in record.getMessage()


# ---- 9. a checkpoint marked complete whose optimizer state is truncated -----------------------------------------
def _train_args(model, out, steps, *extra):
    from conftest import REPO

    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
            "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--lora_init_method", "triu_deltaR", "--checkpointing_steps", "1",
            "--max_sequence_length", "16", *extra]


@pytest.mark.parametrize("damage", ["truncated", "empty", "marker"])
def test_damaged_checkpoint_falls_back_to_the_previous_on_latest(damage, tiny_sd3, tmp_path, caplog, capsys):
    from qrlora.cli.train import main
    from qrlora.files.run_folder import CHECKPOINT_MARKER, checkpoint_problem

    out = tmp_path / "run"
    main(_train_args(tiny_sd3, out, 3))  # checkpoint-1 and checkpoint-2 (the last step writes the final adapter)
    newest = out / "checkpoint-2"
    optimizer = newest / "optimizer.bin"
    if damage == "truncated":
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    elif damage == "empty":
        optimizer.write_bytes(b"")
    else:
        (newest / CHECKPOINT_MARKER).write_text("{")
    line = one_error(capsys, lambda: main(_train_args(tiny_sd3, out, 4, "--resume_from_checkpoint", str(newest))))
    assert str(newest) in line and "damaged" in line
    with caplog.at_level("WARNING"):
        main(_train_args(tiny_sd3, out, 4, "--resume_from_checkpoint", "latest"))
    said = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(said) == 1 and str(newest) in said[0], said
    assert any("resuming from" in r.getMessage() and "checkpoint-1" in r.getMessage() for r in caplog.records)
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-2").is_dir()  # step 2 trained and saved again
    assert checkpoint_problem(out / "checkpoint-2") is None


# ---- 9. FSDP refusals: printed once (rank 0), a non-zero exit on every rank ------------------------------------
@pytest.mark.parametrize("rank, printed", [("0", 1), ("1", 0)])
def test_fsdp_refusal_is_printed_by_rank_0_only(rank, printed, tiny_sd3, tmp_path, monkeypatch, capsys):
    from conftest import REPO
    from qrlora import errors
    from qrlora.cli.train import main

    monkeypatch.setattr(errors, "QUIET_RANK_WAIT_S", 0.0)
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "RANK": rank, "LOCAL_RANK": rank,
                        "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        main(["--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
              "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert len(error_lines(err)) == printed and all("fsdp_version 1" in line for line in error_lines(err))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["fsdp_version: 1", "fsdp_transformer_layer_cls_to_wrap: NoSuchBlock"])
def test_fsdp_refusal_in_a_real_launch_is_one_line_and_leaves_no_run_folder(setting, tiny_sd3, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, free_port

    key = setting.split(":")[0]
    config = tmp_path / "fsdp.yaml"
    lines = (REPO / "configs/accelerate_fsdp.yaml").read_text().splitlines()
    lines = [line for line in lines if not line.strip().startswith((key, f"# {key}"))]
    at = lines.index("fsdp_config:") + 1
    config.write_text("\n".join(lines[:at] + [f"  {setting}"] + lines[at:]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "qrlora.train",
                           "--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir",
                           str(REPO / "assets/cnt/cat"), "--instance_prompt", "a photo of a <c> cat", "--resolution",
                           "64", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = error_lines(proc.stderr)
    assert len(said) == 1 and setting.split(": ")[1] in said[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# ---- 10. study workers say third-party notices as the command does -----------------------------------------------
def _torchvision_notice_shown() -> bool:
    """In a worker: would transformers' torchvision notice reach the user? (the CLI's filter silences it)"""
    import logging

    import transformers  # noqa: F401  (its logging handler exists once imported)

    logger = logging.getLogger("transformers")
    record = logging.LogRecord("transformers", logging.WARNING, "", 0,
                               "CLIPImageProcessor requires torchvision; falling back", (), None)
    return all(f.filter(record) for h in logger.handlers for f in h.filters) and bool(logger.handlers)


@pytest.mark.slow  # a spawned worker imports torch and transformers afresh (~15 s on two loaded cores)
def test_study_workers_silence_what_the_command_silences():
    from qrlora.cli.world_study import _pool

    with _pool(1) as pool:
        assert pool.submit(_torchvision_notice_shown).result(timeout=120) is False
