"""Low-memory frozen base for large denoisers (FLUX.1 is 12B parameters): the adapter path never reads the base
weight, so the base Linears can be stored in fp8 (torchao) or nf4 (bitsandbytes, QLoRA-style) after the bases
were decomposed from the bf16 weights. Both need a CUDA GPU and their library; anything else is a clear error.

Not yet validated on a GPU in this repository's CI (no GPU there): see docs/memory.md.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import UserError
from .layers import AdapterState

LIBRARIES = {"fp8": "torchao", "nf4": "bitsandbytes"}


def check_available(precision: str) -> None:
    """Raise a one-line ``UserError`` unless ``precision``'s library and a CUDA GPU are present."""
    lib = LIBRARIES[precision]
    if importlib.util.find_spec(lib) is None:
        raise UserError(f"--base_precision {precision} needs the {lib} package (pip install {lib}); use bf16 instead")
    if not torch.cuda.is_available():
        raise UserError(f"--base_precision {precision} needs a CUDA GPU; use bf16 on this machine")


def _base_linears(model: nn.Module):
    """``(parent, name, linear)`` for every base ``nn.Linear`` (adapter tensors live in AdapterState, never here)."""
    for parent in model.modules():
        if isinstance(parent, AdapterState):
            continue
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                yield parent, name, child


def quantize_base_(model: nn.Module, precision: str, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Store every frozen base Linear of ``model`` in ``precision`` (fp8 weight-only or nf4), on the GPU."""
    check_available(precision)
    if precision == "fp8":
        from torchao.quantization import float8_weight_only, quantize_

        adapter_ids = {id(m) for m in model.modules() if isinstance(m, AdapterState)}
        quantize_(model, float8_weight_only(), filter_fn=lambda m, fqn: type(m) is nn.Linear and id(m) not in adapter_ids)
        return model
    import bitsandbytes as bnb

    for parent, name, linear in list(_base_linears(model)):
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, name, q.to("cuda"))  # moving to CUDA quantizes the weight
    return model
