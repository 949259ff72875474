"""The real-size rehearsal's code path (bench/rehearsal.py) and the prepared GPU check (bench/gpu_check.sh), run on the
CPU at reduced size so neither can rot (issue 28). The real-size reports are bench/reports/rehearsal_*.json."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def check_report(report: dict) -> None:
    s = report["summary"]
    assert s["failed_parts"] == [], {k: v.get("error", "")[-800:] for k, v in report["parts"].items() if v.get("failed")}
    assert s["resume_bit_exact"] is True
    assert s["step_s"] and s["decompose_total_s"] and s["decompose_worst_angle_deg"] < 1.0
    assert s["estimated_training_peak_gib"] > 0 and s["measured_training_peak_gib"] > 0
    exports = report["parts"]["merge_export"]["exports"]
    assert exports["adapter_change_relative_to_output"] > 1e-3  # the compared adapter does change the output
    assert exports["diffusers"]["relative_difference"] < 1e-3
    assert s["kohya_matches_block_counts"] is True
    if report["backbone"] == "flux" and not report["dry_run"]:  # diffusers' kohya converter needs the real width
        assert exports["kohya"]["relative_difference"] < 1e-3
    merge = report["parts"]["merge_export"]["merge"]
    # The bf16 merge is as close to the float32 truth as the bf16 live pair is (rounding), not worse.
    assert merge["merged_bf16_error_relative_to_change"] < 2 * merge["live_bf16_error_relative_to_change"] + 0.05


@pytest.mark.slow
def test_the_gpu_check_runs_its_code_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--output", str(out), "--workdir", str(work)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for backbone in ("sd3", "sdxl", "flux"):
        report = json.loads((out / f"rehearsal_{backbone}.json").read_text())
        assert report["dry_run"] and report["backbone"] == backbone
        check_report(report)
        assert (work / f"work_{backbone}").is_dir()
    # The output folder holds the reports alone (a GPU machine sends back a few small files; the run folders with
    # their full-size checkpoints stay in --workdir).
    assert sorted(p.name for p in out.iterdir()) == [f"rehearsal_{b}.json" for b in ("flux", "sd3", "sdxl")]


# The real-size runs committed so far (each takes 20-60 minutes on 2 shared cores; see docs/real-size.md).
COMMITTED = ["sd3", "sdxl", "flux"]


@pytest.mark.parametrize("backbone", COMMITTED)
def test_the_committed_real_size_reports_hold(backbone):
    """What the real-size run on this machine's size measured (python -m bench.rehearsal --backbone X)."""
    report = json.loads((REPO / "bench" / "reports" / f"rehearsal_{backbone}.json").read_text())
    assert not report["dry_run"]
    check_report(report)
    built = report["parts"]["build"]
    from qrlora.backbones import BACKBONES

    published = json.loads(json.dumps(BACKBONES[backbone].published_config))
    config = built["denoiser_config"]
    cut = {"num_layers", "num_single_layers"} if backbone == "flux" else set()
    assert {k: v for k, v in config.items() if k not in cut} == {k: v for k, v in published.items() if k not in cut}


def test_the_docs_table_is_the_committed_reports():
    from bench import rehearsal

    page = rehearsal.TABLE_PAGE.read_text()
    start, end = rehearsal.TABLE_MARKERS
    block = page.split(start, 1)[1].split(end, 1)[0].strip()
    reports = {b: json.loads(p.read_text()) for b in ("sd3", "sdxl", "flux")
               if (p := REPO / "bench" / "reports" / f"rehearsal_{b}.json").exists()}
    assert block == rehearsal.render_table(reports).strip(), "run python -m bench.rehearsal --table"


def test_a_part_never_runs_past_the_deadline():
    from bench.rehearsal import MIN_PART_S, part_timeout

    assert part_timeout(140, None, 1000.0) == 140
    assert part_timeout(140, 1000.0 + 60, 1000.0) == 60  # cut to what is left
    assert part_timeout(140, 1000.0 + 500, 1000.0) == 140
    assert part_timeout(140, 1000.0 + MIN_PART_S - 1, 1000.0) is None  # too little left: not started


def test_a_rehearsal_past_its_deadline_records_every_part_as_not_started(tmp_path):
    import time

    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "bench.rehearsal", "--backbone", "sd3", "--cpu-dry-run",
                           "--workdir", str(tmp_path / "w"), "--output", str(out), "--deadline", str(time.time())],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["build", "decompose", "train", "resume", "estimate", "merge_export"]
    assert all(p["not_started"] and p["failed"] for p in parts.values())
    assert not (tmp_path / "w" / "pipeline").exists()  # nothing was built


def test_the_gpu_check_refuses_a_budget_that_is_not_seconds(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-dry-run", "--budget", "8m", "--output", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "bench/gpu_check.sh: --budget takes whole seconds, not '8m'"]
