"""The README's first command, end to end (fewer training steps than the default to keep CI short)."""

import re

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`


def test_demo_end_to_end(tmp_path):
    demo = tmp_path / "demo"
    proc = run_script(["bash", "demo.sh"], env={"DEMO_DIR": str(demo), "STEPS": "3"})
    assert "residual form and delta form agree" in proc.stdout
    # The world's classifier read every cell of both pairs' grids; one verdict line per pair, and the study's line.
    assert re.search(r"QR-LoRA pair: both right in \d/9 cells; LoRA pair: both right in \d/9 cells", proc.stdout)
    assert "the study (bench/reports/world_study.json" in proc.stdout
    for rel in ("verdict.png", "grid_lora/grid.png", "content/pytorch_lora_weights.safetensors", "style/pytorch_lora_weights.safetensors",
                "residual/sd3_residual_weights.safetensors", "grid_residual/grid.png", "grid_delta/grid.png",
                "grid_delta/inference_s0.50_c1.00.png", "similarity/all_statistics_summary.json"):
        assert (demo / rel).is_file(), rel
    assert list((demo / "similarity").glob("*.png"))
    # the comparison's file is named where it ends up, not in the temporary folder it was written to
    assert f"wrote {demo / 'similarity_vs_lora' / 'dW_comparison.json'}" in proc.stdout and ".tmp" not in proc.stdout
    # A folder the demo did not make is never touched.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    proc = run_script(["bash", "demo.sh"], env={"DEMO_DIR": str(foreign)}, check=False)
    assert proc.returncode != 0 and "not made by demo.sh" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]
