"""Devices and dtypes: the one owner of their names and defaults for every command-line tool.

Every tool spells a dtype the same way (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``, plus
accelerate's ``no`` for "no mixed precision") and picks the same defaults (CUDA when present, else the CPU;
bfloat16 on a GPU, float32 on the CPU), so a flag means one thing everywhere and a new spelling is added once.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

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


# safetensors' dtype names (the header's "dtype" field) of the floating types a checkpoint may store.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _weight_files(model_path: str, subfolder: str) -> list[Path]:
    """The non-variant safetensors shards of ``model_path/subfolder`` (a local folder, else a hub id, fetched as
    ``from_pretrained`` would fetch them, so the load that follows reads the same files from the cache)."""
    folder = Path(model_path) / subfolder
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        root = snapshot_download(model_path, allow_patterns=[f"{subfolder}/diffusion_pytorch_model.safetensors",
                                                             f"{subfolder}/diffusion_pytorch_model-*.safetensors"])
        folder = Path(root) / subfolder
    return sorted(folder.glob("diffusion_pytorch_model.safetensors")) + sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))


def stored_dtype(model_path: str, subfolder: str) -> torch.dtype | None:
    """The floating dtype most of the checkpoint's elements are stored in, read from the safetensors headers alone
    (8 bytes of length, then JSON; no tensor is read). None when there is no safetensors file (a .bin checkpoint).

    Why: ``from_pretrained(torch_dtype=None)`` builds the model in torch's default float32 and upcasts every weight
    into it, so a bf16 FLUX.1-dev takes 44 GiB of host memory instead of 22 (issue 28). Loading "as stored" must
    pass the stored dtype explicitly.
    """
    counts: Counter = Counter()
    for file in _weight_files(model_path, subfolder):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__" and entry["dtype"] in SAFETENSORS_DTYPES:
                n = 1
                for d in entry["shape"]:
                    n *= d
                counts[SAFETENSORS_DTYPES[entry["dtype"]]] += n
    return counts.most_common(1)[0][0] if counts else None
