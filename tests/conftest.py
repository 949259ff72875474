"""Shared fixtures: tiny offline pipelines (built once per session) and a runner for the real shell wrappers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Tests never reach a hub, and two BLAS threads per process fight over CI's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_pipelines")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_root) -> Path:
    from qrlora.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3", tiny_root / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tiny_root) -> Path:
    from qrlora.tiny import build_tiny_pipeline

    return build_tiny_pipeline("flux", tiny_root / "flux")


def run_script(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a repository script (bash wrapper or python) from the repository root, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
