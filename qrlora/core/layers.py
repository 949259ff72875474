"""The one adapter layer: a base ``nn.Linear`` plus any number of named adapters, ``y = base(x) + sum w_k path_k(x)``.

The base layer is never modified, so with zero-initialised coefficients the model is exactly the original at
step 0, a quantized or low-precision base layer works unchanged, and several adapters can share one base (live
merges of MoE adapters). Frozen tensors are buffers and trainable ones the only parameters (PEFT's split of
adapter vs other parameter names), so ``model.parameters()`` filtered by ``requires_grad`` is the optimizer's set.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .methods import AdapterConfig, Method, get_method


class AdapterState(nn.Module):
    """One adapter's tensors on one layer: buffers for the frozen basis, parameters for what trains."""

    def __init__(self, config: AdapterConfig, tensors: dict[str, torch.Tensor], trainable: bool = True):
        super().__init__()
        self.config = config
        self.method: Method = get_method(config.method)
        for name in self.method.tensor_names:
            value = tensors[name].detach().to(torch.float32).contiguous()
            if name in self.method.trainable:
                self.register_parameter(name, nn.Parameter(value, requires_grad=trainable))
            else:
                self.register_buffer(name, value)
        # Structural masks (triu_deltaR's upper triangle) are non-persistent buffers: never written to a file,
        # moved by ``.to()`` with everything else. The forward multiplies the trainable tensor by its mask, so
        # the masked entries get exactly zero gradient (out of clipping and optimizer moments) with no hook to
        # lose when ``.to()`` replaces a parameter; the cost is one (r x in) product per call.
        self.masked: tuple[str, ...] = ()
        for name in self.method.trainable:
            mask = self.method.grad_mask(name, self.tensors())
            if mask is not None and trainable:
                self.register_buffer(self.mask_name(name), mask.to(torch.float32), persistent=False)
                self.masked += (name,)

    @staticmethod
    def mask_name(name: str) -> str:
        return f"{name}_grad_mask"

    def mask(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The 0/1 constraint mask of trainable tensor ``name``, same shape, in ``dtype``."""
        return getattr(self, self.mask_name(name)).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor by its registry name (parameters and buffers alike)."""
        return {name: getattr(self, name) for name in self.method.tensor_names}

    @torch.no_grad()
    def apply_constraints_(self) -> None:
        """Re-impose structural constraints (``triu_deltaR``'s upper triangle) after an optimizer step."""
        for name in self.masked:
            param = getattr(self, name)
            param.mul_(self.mask(name, param.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adapter math runs in the input's dtype (bf16 training casts the small factors, never the base weight).
        t = {name: v if v.dtype == x.dtype else v.to(x.dtype) for name, v in self.method.path_tensors(self.tensors()).items()}
        for name in self.masked:
            t[name] = t[name] * self.mask(name, x.dtype)
        return self.method.output(t, x, self.config.scale)

    def delta_weight(self) -> torch.Tensor:
        """``dW`` (out x in) in float32."""
        return self.method.delta_weight({k: v.float() for k, v in self.tensors().items()}, self.config.scale)

    def extra_repr(self) -> str:
        return f"method={self.config.method}, rank={self.config.rank}, alpha={self.config.lora_alpha:g}"


class AdapterLinear(nn.Module):
    """Wraps a base Linear; adds each active adapter's path, scaled by its merge weight."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.adapter_weights: dict[str, float] = {}

    # Attributes some diffusers code reads from the Linear it expects (dtype checks, fused projections).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, state: AdapterState, weight: float = 1.0) -> None:
        """Attach an adapter under ``name`` (replacing one of the same name)."""
        self.adapters[name] = state
        self.adapter_weights[name] = float(weight)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        for name, state in self.adapters.items():
            w = self.adapter_weights[name]
            if w == 0.0:
                continue  # an adapter at weight 0 leaves the output bit-identical to the base
            delta = state(x)
            y = y + (delta if w == 1.0 else delta * w).to(y.dtype)
        return y


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(path, layer)`` for every adapted Linear, path as in the unwrapped model (``blocks.0.attn.to_q``)."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def apply_constraints_(model: nn.Module) -> None:
    """Re-impose every adapter's structural constraint; the trainer calls it after each optimizer step."""
    for _, layer in adapter_layers(model):
        for state in layer.adapters.values():
            state.apply_constraints_()


def cast_base_model_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the base model's floating tensors to ``dtype`` and leave every adapter's tensors in float32.

    ``model.to(dtype)`` would also round the frozen Q and R, which the adapter file and the residual need exact.
    """
    for module in model.modules():
        if isinstance(module, AdapterState):
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))
    return model


def unwrap_adapters_(model: nn.Module) -> nn.Module:
    """Put every base Linear back in place of its wrapper (drops all adapters)."""
    for name, layer in list(adapter_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return model
