"""Smoke tests of the benchmarks in bench/: they run, and write valid JSON with the expected fields.

No test asserts a timing or a speed ratio (those depend on the machine); the correctness fields the benches
compute (error ratios, exact parameter ratios, agreement of the two merge routes) are checked, since they
do not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def _run(args: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _machine_fields(payload: dict) -> None:
    for key in ("date", "cpu", "logical_cpus", "torch", "command"):
        assert key in payload["machine"], key


def test_decompose_smoke(tmp_path):
    out = tmp_path / "decompose.json"
    proc = _run(["-m", "bench.decompose", "--smoke", "--repeats", "1", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "decompose" and payload["mode"] == "smoke"
    _machine_fields(payload)
    assert len(payload["shapes"]) == 3
    for row in payload["shapes"]:
        sweep = {m for m in row["methods"] if m.startswith("ours_niter_")}
        assert set(row["methods"]) == {"published", "peft_pissa_niter_4", "ours"} | sweep and len(sweep) == 4
        for m in row["methods"].values():
            for key in ("seconds", "speedup_vs_published", "error_ratio", "angle_deg", "orthogonality", "orthogonality_2norm",
                        "r_below_diagonal"):
                assert key in m, key
            assert m["error_ratio"] >= 1 - 1e-4  # nothing beats Eckart-Young
            assert m["r_below_diagonal"] == 0.0
        assert row["methods"]["published"]["error_ratio"] == pytest.approx(1.0, abs=1e-4)
        assert row["methods"]["ours"]["error_ratio"] < 1.01
    (total,) = payload["totals"].values()
    # SD3-medium's layer counts as its wrappers train them: 8 attention projections, the last block context-free
    # (no to_add_out) and its add_q_proj discarded (the block drops its context output): 24 * 8 - 2
    assert total["layers"] == 190 and {"published", "peft_pissa_niter_4", "ours"} <= set(total["speedup_vs_published"])
    assert (out.with_suffix(".png")).stat().st_size > 0  # the speed / error trade-off plot
    assert {"speedup_total", "error_ok", "orthogonality_ok"} <= set(payload["verdict"])
    assert "| shape (out x in) |" in proc.stdout


def test_decompose_sweep_smoke(tmp_path):
    """The stopping rule on the sweep's 16 seeded weights at 1024 x 768, rank 64 (gaps 1.01-1.05, undefined, clusters,
    stairs, a dominant sigma_1, Gaussian): no violation of either goal."""
    out = tmp_path / "sweep.json"
    proc = _run(["-m", "bench.decompose_sweep", "--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "decompose_sweep" and payload["mode"] == "smoke"
    summary = payload["summary"]
    assert summary["weights"] == len(payload["weights"]) == 16
    assert summary["violations"] == [], summary["violations"]
    assert summary["worst_error_ratio"] <= 1.001 and summary["worst_angle_deg_where_defined"] <= 1.0
    assert "violations" in proc.stdout


def test_train_step_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    proc = _run(["-m", "bench.train_step", "--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "train_step" and payload["mode"] == "smoke"
    _machine_fields(payload)
    by_name = {v["variant"]: v for v in payload["variants"]}
    assert set(by_name) == {"peft_lora", "deltaR"}
    for v in by_name.values():
        assert "error" not in v, v.get("error")
        for key in ("step_seconds_median", "peak_rss_mib", "trainable_params", "step_time_ratio", "peak_memory_ratio",
                    "trainable_param_ratio", "init_seconds", "step_gflops", "step_flops_ratio"):
            assert key in v, key
    ours = by_name["deltaR"]
    assert ours["param_ratio_exact"] is True
    assert ours["trainable_param_ratio"] == pytest.approx(ours["expected_param_ratio"])
    assert set(payload["verdict"]["deltaR"]) == {"step_time_ok", "peak_memory_ok", "params_ok"}
    assert "| variant |" in proc.stdout


def test_merge_smoke(tmp_path):
    out = tmp_path / "merge.json"
    _run(["-m", "bench.merge", "--smoke", "--repeats", "1", "--tmpdir", str(tmp_path), "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "merge" and payload["mode"] == "smoke"
    _machine_fields(payload)
    for row in payload["shapes"]:
        assert row["relative_difference"] < 1e-5  # the two routes merge to the same weights
        assert row["residual_bytes"] >= row["shape"][0] * row["shape"][1] * 4
        assert {"delta", "residual_warm", "residual_cold"} == set(row["seconds"])
    total = payload["total"]
    assert total["layers"] == 342
    assert total["residual_bytes_avoided"] > 0 and "residual_warm_over_delta" in total
    assert not list(tmp_path.glob("residual_*.safetensors"))  # temporary residual files are cleaned up


def test_gpu_flux_without_gpu_stops_cleanly(tmp_path):
    # The wrapper: no nvidia-smi on PATH -> a message and exit 0, nothing written.
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_flux.sh"), "--output", str(tmp_path / "g.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert "no NVIDIA GPU" in proc.stdout
    # A fake nvidia-smi that sees a GPU, but a torch without CUDA -> the second check stops it.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake'\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(BENCH / "gpu_flux.sh"), "--output", str(tmp_path / "g.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stdout
    assert not (tmp_path / "g.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_flux_python_without_gpu(tmp_path):
    proc = _run(["-m", "bench.gpu_flux", "--output", str(tmp_path / "g.json")], timeout=120)
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "g.json").exists()


def test_gpu_flux_logic_on_tiny_cpu_model():
    """The GPU script's init and training code on a tiny FLUX config on the CPU, in-process (no timing)."""
    from bench import gpu_flux
    size = gpu_flux.SIZES["tiny-cpu"]
    init = gpu_flux.run_init("cpu", True, size)
    assert init["layers"] == sum(init["counts"].values()) == 15
    assert set(init["extrapolated_seconds"]) == {"published", "peft_pissa_niter_4", "ours"}
    peft = gpu_flux.run_train("peft_lora", "cpu", True, size)
    ours = gpu_flux.run_train("triu_deltaR", "cpu", True, size)
    for r in (peft, ours):
        assert r["step_seconds_median"] > 0 and r["peak_memory_gib"] > 0
    # sum(in) == sum(out) over the tiny targets (ff up/down projections pair up): exactly half of LoRA's
    assert ours["trainable_params"] * 2 == peft["trainable_params"]
    payload = {"mode": "tiny-cpu", "model": {"weights": "random"}, "rank": size["rank"], "resolution_px": 64,
               "precision": "bf16", "timing": "-", "machine": {"cpu": "cpu", "date": "-"}, "skipped": {},
               "init": init, "train": [peft, ours]}
    assert "| variant |" in gpu_flux.render(payload)


def test_readme_tables_are_the_committed_reports():
    """Every benchmark number in docs/benchmarks.md comes from ``bench/reports/*.json``: editing one without the other
    fails."""
    from bench import readme_table
    assert readme_table.BENCH_PAGE == REPO / "docs/benchmarks.md"
    readme = readme_table.BENCH_PAGE.read_text()
    assert readme.count(readme_table.START) == 1 and readme.count(readme_table.END) == 1
    block = readme.split(readme_table.START, 1)[1].split(readme_table.END, 1)[0]
    assert readme_table.START + block + readme_table.END == readme_table.render(), \
        "docs/benchmarks.md tables differ from bench/reports: run python -m bench.readme_table --write"


def test_bucketing_smoke(tmp_path):
    out = tmp_path / "bucketing.json"
    _run(["-m", "bench.bucketing", "--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bucketing" and payload["mode"] == "smoke"
    _machine_fields(payload)
    assert set(payload["images_per_second"]) == {"square_crops", "buckets", "per_round"}
    assert payload["target_ratio"] == 0.95 and "ratio_buckets_to_square" in payload
