"""What the analysis runs share: strict JSON output, the ``--output_dir`` check and the ``--device`` flag."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError
from ..outputs import StagedFolder, atomic_output


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON; refuses NaN/inf (``allow_nan=False``) so files stay strict JSON."""
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def _output_dir(path: str | os.PathLike, key_file: str, overwrite: bool) -> StagedFolder:
    """The run's output folder, staged: checked now (a folder, writable, ``key_file`` of an earlier run not
    there unless ``overwrite``), filled in a hidden sibling, published all at once by ``.publish()``."""
    return StagedFolder(path, key_files=[key_file], overwrite=overwrite)


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
