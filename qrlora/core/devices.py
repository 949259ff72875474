"""Devices and dtypes: the one owner of their names and defaults for every command-line tool.

Every tool spells a dtype the same way (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, plus
accelerate's ``no`` for "no mixed precision") and picks the same defaults (CUDA when present, else the CPU;
bfloat16 on a GPU, float32 on the CPU), so a flag means one thing everywhere and a new spelling is added once.
"""

from __future__ import annotations

import torch

from ..errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# accelerate's --mixed_precision names: the dtype the frozen weights and the forward pass run in.
MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str | None, flag: str = "--device") -> torch.device:
    """The device a ``--device`` value names (None or ``"auto"``: the default), or a one-line ``UserError``."""
    if name in (None, "", "auto"):
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag}: '{name}' is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name}: CUDA is not available here (use cpu, or the wrapper's GPU id)")
    return device


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU (half the memory, the dtype the published checkpoints ship in), float32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(name: str | None, device: str | torch.device, flag: str = "--dtype") -> torch.dtype:
    """The dtype a ``--dtype`` value names (None or ``"auto"``: the device's default), or a one-line ``UserError``."""
    if name in (None, "", "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"{flag}: '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
