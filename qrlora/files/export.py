"""Standard LoRA files from a QR-LoRA adapter: ``python -m qrlora.export IN OUT [--format diffusers|kohya]``.

Both layouts hold factors with ``B A = dW`` for every adapted Linear (``s`` folded into ``B``), so a client that
applies ``W + (alpha / rank) B A`` at ``alpha = rank`` reproduces our merge exactly.

- ``diffusers`` (default): ``{component}.P.lora_A.weight`` (r x in) / ``lora_B.weight`` (out x r), loads with
  ``pipe.load_lora_weights`` and PEFT. The LoRA config (``r``, ``lora_alpha``, ``target_modules``) is written in
  the ``lora_adapter_metadata`` entry as diffusers' ``save_lora_weights(..., *_lora_adapter_metadata=...)`` does,
  so diffusers and PEFT configure themselves. No ``.alpha`` keys: they break diffusers' SD3 and SDXL loaders.
- ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` in the module names of
  the model's original checkpoint (FLUX: BFL's ``double_blocks`` / ``single_blocks``; SD3: ``joint_blocks``;
  SDXL keeps diffusers' UNet names, which ComfyUI and A1111 map), the layout ComfyUI, A1111/Forge and kohya's
  tools read. Linears that the original checkpoint fuses (``qkv``, FLUX's ``linear1``) become one LoRA of rank
  ``parts x r``: ``down`` stacks each part's ``A`` (zeros for parts we did not train), ``up`` is block-diagonal,
  and ``alpha`` equals the rows of ``down`` (scale 1). Keys come from diffusers' ``convert_state_dict_to_kohya``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya

from ..backbones.base import Backbone, OriginalModule
from .checkpoint import FORMAT_NAME, LORA_ADAPTER_METADATA_KEY, AdapterFile, atomic_save_safetensors, backbone_of
from ..errors import UserError

FORMATS = ("diffusers", "kohya")


def lora_factors(adapter: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{P: (B, A)}`` with ``B A = dW`` (B out x k, A k x in, scale folded into B); ``k`` is the export rank.

    Raises:
        UserError: a token-dependent method (``moe``), which has no weight-space form.
    """
    adapter.require_weight_change("a standard LoRA file is a weight change", "merge it live with `python -m qrlora.merge`")
    return {p: adapter.method.lora_factors(named, adapter.config.scale) for p, named in adapter.layers.items()}


def lora_export_tensors(adapter: AdapterFile) -> dict[str, torch.Tensor]:
    """Diffusers / PEFT LoRA tensors ``{component}.P.lora_A.weight`` / ``lora_B.weight`` with ``B A = dW``.

    ``qr`` exports at rank 2r (``[R; R0]``, ``s [Q, -Q0]``); ``moe`` is refused.
    """
    out = {}
    for p, (B, A) in lora_factors(adapter).items():
        out[f"{adapter.component}.{p}.lora_A.weight"] = A.contiguous()
        out[f"{adapter.component}.{p}.lora_B.weight"] = B.contiguous()
    return out


def export_rank(tensors: dict[str, torch.Tensor]) -> int:
    """The rank of an exported file: rows of its ``lora_A`` / ``lora_down`` factors (all layers share it)."""
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))}
    return max(ranks)


def diffusers_lora_metadata(adapter: AdapterFile, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """File metadata of the diffusers layout: the PEFT ``LoraConfig`` under ``lora_adapter_metadata``.

    The config is prefixed with the component (``transformer.r``...), exactly as ``save_lora_weights`` packs it;
    ``lora_alpha = r`` because the scale is already in ``B``; ``target_modules`` lists the adapted paths, so PEFT
    wraps those Linears and no other.
    """
    rank = export_rank(tensors)
    config = {"r": rank, "lora_alpha": rank, "target_modules": sorted(adapter.layers)}
    packed = {f"{adapter.component}.{k}": v for k, v in config.items()}
    return {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
        "exported_from": FORMAT_NAME,
        "method": adapter.config.method,
        "source_rank": str(adapter.config.rank),
        "backbone": adapter.backbone or "",
        "base_model": adapter.base_model or "",
    }


def _fuse(original: str, parts: dict[int, tuple[torch.Tensor, torch.Tensor]], relative_rows: tuple[int, ...]):
    """One LoRA ``(up, down)`` for a fused original Linear from the factors of the parts we have.

    down (n k x in) stacks each part's ``A`` (zeros for a missing part); up (sum rows x n k) is block-diagonal, so
    ``up @ down`` stacks each part's ``B A`` and is zero on the missing parts' rows.
    """
    B0, A0 = next(iter(parts.values()))
    k, width = A0.shape
    index0 = next(iter(parts))
    unit = B0.shape[0] // relative_rows[index0]
    rows = [unit * r for r in relative_rows]
    for index, (B, A) in parts.items():
        if A.shape != (k, width) or B.shape[0] != rows[index]:
            raise UserError(f"layer {original}: part {index} has shape {tuple(B.shape)} x {tuple(A.shape)}, "
                            f"expected ({rows[index]}, {k}) x ({k}, {width})")
    n = len(relative_rows)
    down = torch.zeros(n * k, width, dtype=A0.dtype)
    up = torch.zeros(sum(rows), n * k, dtype=B0.dtype)
    offset = 0
    for index, size in enumerate(rows):
        if index in parts:
            B, A = parts[index]
            down[index * k:(index + 1) * k] = A
            up[offset:offset + size, index * k:(index + 1) * k] = B
        offset += size
    return up, down


def kohya_export_tensors(adapter: AdapterFile, backbone: Backbone) -> dict[str, torch.Tensor]:
    """Kohya / ComfyUI / A1111 LoRA tensors: ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    Raises:
        UserError: an adapted layer that has no module in the backbone's original layout (named).
    """
    factors = lora_factors(adapter)
    if not backbone.original_layout:
        grouped = factors
    else:
        fused: dict[str, tuple[OriginalModule, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for p, BA in factors.items():
            found = next(((m, hit) for m in backbone.original_layout if (hit := m.match(p))), None)
            if found is None:
                raise UserError(f"{adapter.path}: layer {p} has no module in the original {backbone.name} checkpoint "
                                "layout that kohya-style files use; export it with --format diffusers")
            module, (original, index) = found
            fused.setdefault(original, (module, {}))[1][index] = BA
        grouped = {name: _fuse(name, parts, module.relative_rows()) for name, (module, parts) in fused.items()}
    # diffusers' converter: PEFT names under "unet." -> lora_unet_<path with underscores>, lora_down/up, alpha = rows of down.
    peft_named = {}
    for name, (B, A) in grouped.items():
        peft_named[f"unet.{name}.lora_A.weight"] = A.contiguous()
        peft_named[f"unet.{name}.lora_B.weight"] = B.contiguous()
    tensors = convert_state_dict_to_kohya(peft_named)
    return {k: (v.float() if k.endswith(".alpha") else v) for k, v in tensors.items()}


def export_lora(adapter: AdapterFile, path: str | os.PathLike, layout: str = "diffusers", backbone: str | None = None) -> Path:
    """Write ``adapter`` as a standard LoRA file in ``layout`` (``diffusers`` or ``kohya``); atomic."""
    if layout == "diffusers":
        tensors = lora_export_tensors(adapter)
        return atomic_save_safetensors(tensors, path, diffusers_lora_metadata(adapter, tensors))
    if layout == "kohya":
        model = backbone_of(adapter, backbone)
        tensors = kohya_export_tensors(adapter, model)
        meta = {"exported_from": FORMAT_NAME, "method": adapter.config.method, "source_rank": str(adapter.config.rank),
                "backbone": model.name, "base_model": adapter.base_model or ""}
        return atomic_save_safetensors(tensors, path, meta)
    raise UserError(f"--format: unknown layout '{layout}'; choose one of {', '.join(FORMATS)}")


def kohya_path(adapter_path: str | os.PathLike) -> Path:
    """Where the trainer's ``--output_kohya_format`` puts the kohya file: beside the adapter, ``_kohya`` added."""
    path = Path(adapter_path)
    return path.with_name(f"{path.stem}_kohya{path.suffix}")
