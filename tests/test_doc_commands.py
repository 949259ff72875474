"""Every command block the documentation says runs, run as written.

A fenced ``bash`` block in README.md or a page of ``docs/`` that is preceded by the line ``RUNS_MARKER`` claims to
run offline on the CPU as typed, from the repository root: this test runs each page's marked blocks in order, in a
scratch folder that looks like a checkout (the repository's folders linked in, so what the commands write lands in
the scratch folder), and fails on a non-zero exit. Blocks without the marker are examples for a GPU or the hub.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # trains and renders on the tiny pipelines: left out of `pytest -m "not slow"`

RUNS_MARKER = "<!-- runs: tests/test_doc_commands.py -->"
BLOCK = re.compile(re.escape(RUNS_MARKER) + r"\n```bash\n(.*?)\n```", re.S)
LINKED = ("assets", "qrlora", "SD3_dir", "flux_dir", "SDXL_dir", "scripts", "test", "configs", "bench", "demo.sh")


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def marked_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_every_marker_is_followed_by_a_bash_block():
    """A marker the pattern does not pick up (a blank line, another language) would silently run nothing."""
    for page in pages():
        text = page.read_text()
        assert text.count(RUNS_MARKER) == len(marked_blocks(page)), f"{page.name}: a marker not directly before ```bash"


def test_the_readme_own_images_and_merge_commands_are_marked():
    blocks = "\n".join(marked_blocks(REPO / "README.md"))
    assert "python -m qrlora.tiny" in blocks and "--instance_data_dir" in blocks and "--instance_prompt" in blocks
    assert "python -m qrlora.merge" in blocks


@pytest.mark.parametrize("page", [p for p in pages() if marked_blocks(p)], ids=lambda p: p.name)
def test_marked_commands_run(page, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO / name)
    for block in marked_blocks(page):
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, f"{page.name}: this block failed:\n{block}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if page.name == "README.md":  # what the README says these commands make
        assert (tmp_path / "my_cat" / "pytorch_lora_weights.safetensors").is_file()
        assert list((tmp_path / "my_merge").glob("*.png"))
