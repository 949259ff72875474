"""What the analysis runs share: strict JSON output, the ``--output_dir`` check and the ``--device`` flag."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON; refuses NaN/inf (``allow_nan=False``) so files stay strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


def _output_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: '{name}' is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (use cpu, or the wrapper's GPU id)")
    return device
