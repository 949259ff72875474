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


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """In-process trainer runs each build an Accelerator; accelerate keeps one global state per process."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_pipelines")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_root) -> Path:
    from qrlora.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd3", tiny_root / "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tiny_root) -> Path:
    from qrlora.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline("flux", tiny_root / "flux")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root) -> Path:
    from qrlora.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sdxl", tiny_root / "sdxl")


def run_script(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a repository script (bash wrapper or python) from the repository root, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now: multi-process launches in parallel test workers must not share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_error(capsys, call) -> str:
    """Run a CLI ``call``; assert it exits non-zero with exactly one ``error:`` line and no traceback."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def _denoisers():
    from qrlora.backbones import BACKBONES

    return {name: (b.denoiser_class, b.denoiser_name) for name, b in BACKBONES.items()}


DENOISER = _denoisers()
ADAPTER_TARGETS = {"sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj"],
                   "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj"],
                   "sdxl": ["attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0"]}


def load_denoiser(model_dir, backbone):
    import diffusers

    cls, sub = DENOISER[backbone]
    return getattr(diffusers, cls).from_pretrained(model_dir, subfolder=sub)


def make_adapter(model_dir, backbone, path, method="triu_deltaR", rank=4, seed=0, noise=0.3, num_experts=2):
    """An adapter as training would leave it: bases from the real weights, coefficients moved (seeded noise)."""
    import torch

    from qrlora.files.checkpoint import adapter_from_model, adapter_metadata, save_adapter
    from qrlora.core.inject import inject_adapters
    from qrlora.core.layers import apply_constraints_
    from qrlora.core.methods import AdapterConfig

    denoiser = load_denoiser(model_dir, backbone)
    cfg = AdapterConfig(method=method, rank=rank, num_experts=num_experts)
    inject_adapters(denoiser, cfg, ADAPTER_TARGETS[backbone])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in denoiser.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    apply_constraints_(denoiser)
    meta = adapter_metadata(cfg, component=DENOISER[backbone][1], backbone=backbone, base_model=str(model_dir),
                            targets=ADAPTER_TARGETS[backbone])
    save_adapter(path, adapter_from_model(denoiser, cfg, meta, component=DENOISER[backbone][1]))
    return path
