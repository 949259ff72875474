"""Merging adapters into a denoiser: delta form, residual form, and live MoE merges.

Delta form (default; exact for every static method, no residual file):
    ``W_merged = W + sum_i w_i dW_i``
Residual form (the published route): ``W_merged = W_res + s * basis + sum_i w_i dW_i``, which for QR-LoRA is
``W_res + s Q (R + sum_i w_i dR_i)``; valid only when every adapter holds the same frozen basis (checked).
MoE adapters depend on the token, so they stay live layers, each path scaled by its weight.

``Merger`` snapshots the original weights of every layer it touches, so re-merging with other weights always
starts from the originals and never accumulates rounding error.

Low-precision bases (bf16 / fp16 weights, as FLUX and SD3 ship) are merged live: a bf16 weight has 8 bits of
mantissa, so ``W + dW`` rounded back into it keeps little of a change of 1 % of ``||W||`` (23 % error on ``dW``) and
almost nothing of 0.1 % (164 %) (issue 28). There the weight stays the original and the merged change is an added
path on the layer (``LiveDelta``): the low-rank factors of the static adapters, or the dense combined change of a
TIES / DARE merge, so the rounding error is relative to ``dW``, not to ``W``. Inside ``Merger.folding()`` every
merge folds anyway (a merged checkpoint written to disk is a plain set of weights).
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch
from torch import nn

from ..files.checkpoint import AdapterFile, base_fingerprint, fingerprint_difference
from ..errors import UserError
from ..core.inject import attach_adapter, remove_adapters, set_adapter_weights
from ..core.layers import AdapterLinear

BASIS_RTOL = 1e-4  # bases computed on different devices differ by rounding only


def check_compatible(adapters: Sequence[AdapterFile]) -> None:
    """Refuse adapters of different components, backbones or base models, naming the files.

    Base models are compared by content (``base_fingerprint``, the norms of the adapted base weights), never by
    the path or hub id they were opened from: the same model under two paths is the same model.
    """
    first = adapters[0]
    for other in adapters[1:]:
        if other.component != first.component:
            raise UserError(f"{other.path} adapts the {other.component}, {first.path} the {first.component}")
        if first.backbone and other.backbone and first.backbone != other.backbone:
            raise UserError(f"{other.path} is a {other.backbone} adapter, {first.path} a {first.backbone} adapter")
        layer = fingerprint_difference(first.metadata.get("base_fingerprint"), other.metadata.get("base_fingerprint"))
        if layer:
            raise UserError(f"{other.path} was trained on another base model than {first.path} "
                            f"(the base weight of layer {layer} differs): different base models")


def check_base_model(model: nn.Module, adapters: Sequence[AdapterFile]) -> None:
    """Refuse an adapter whose recorded base weights differ from ``model``'s (trained on another model)."""
    for adapter in adapters:
        recorded = adapter.metadata.get("base_fingerprint")
        if not recorded:
            continue
        weights = {}
        for path in adapter.layers:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue  # reported with the layer's name when the adapter is applied
            weights[path] = getattr(module, "base_layer", module).weight
        layer = fingerprint_difference(recorded, base_fingerprint(weights))
        if layer:
            raise UserError(f"{adapter.path} was trained on another base model ({adapter.base_model}); "
                            f"the base weight of layer {layer} differs: different base models")


def check_shared_basis(adapters: Sequence[AdapterFile]) -> None:
    """Residual form needs one basis for all: raise naming the first layer whose frozen basis differs."""
    first = adapters[0]
    for other in adapters[1:]:
        if first.method.basis != other.method.basis:
            raise UserError(
                f"{other.path} ({other.config.method}) and {first.path} ({first.config.method}) store different bases; "
                "residual form needs shared Q and R, use the delta form (omit --residual_path)"
            )
        for p, named in first.layers.items():
            if p not in other.layers:
                continue
            for name in first.method.basis:
                a, b = named[name], other.layers[p][name]
                if a.shape != b.shape or not torch.allclose(a, b, rtol=BASIS_RTOL, atol=BASIS_RTOL * float(a.abs().max())):
                    raise UserError(
                        f"layer {p}: {name} differs between {first.path} and {other.path}; residual form needs shared "
                        "Q and R (same base model, rank, method and seed): use the delta form (omit --residual_path)"
                    )


def check_mergeable(adapters: Sequence[AdapterFile], residual: Mapping[str, torch.Tensor] | None = None) -> None:
    """Everything about a merge that can be refused from the files alone, before any model is loaded."""
    if not adapters:
        raise UserError("no adapters to merge")
    check_compatible(adapters)
    if residual is not None:
        for adapter in adapters:
            adapter.require_weight_change("the residual form folds weight changes", "leave out --residual_path")
        check_shared_basis(adapters)


LIVE_DELTA = "merged_delta"  # the adapter name of the live merged change on a low-precision layer
FOLD_DTYPES = (torch.float32, torch.float64)  # weights precise enough to hold W + dW


class LiveDelta(nn.Module):
    """A merged weight change applied as a path beside the base layer: ``x -> x A^T B^T`` for low-rank factors
    B (out x k), A (k x in), or ``x -> x dW^T`` for a dense dW (out x in), in the input's dtype."""

    def __init__(self, B: torch.Tensor | None = None, A: torch.Tensor | None = None, dense: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("B", B)
        self.register_buffer("A", A)
        self.register_buffer("dense", dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return x @ self.dense.to(x.dtype).T
        return (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T

    def apply_constraints_(self) -> None:  # AdapterLinear's adapters share this interface; nothing to constrain
        pass

    def delta_weight(self) -> torch.Tensor:
        """``dW`` (out x in) in float32."""
        return self.dense.float() if self.dense is not None else self.B.float() @ self.A.float()


def _drop_live(layer: AdapterLinear) -> None:
    if LIVE_DELTA in layer.adapters:
        del layer.adapters[LIVE_DELTA]
        layer.adapter_weights.pop(LIVE_DELTA, None)


class Merger:
    """Folds static adapters into a denoiser's weights and keeps MoE adapters live, re-mergeable at any weights.

    Args:
        model: the denoiser (``pipe.transformer`` or ``pipe.unet``).
        adapters: adapter files; static ones are folded, MoE ones attached as live adapters.
        residual: optional ``{P: W_res}``; when given, static layers merge in residual form.
    """

    def __init__(self, model: nn.Module, adapters: Sequence[AdapterFile], residual: Mapping[str, torch.Tensor] | None = None):
        check_mergeable(adapters, residual)
        check_base_model(model, adapters)
        self.model = model
        self.adapters = list(adapters)
        self.static = [i for i, a in enumerate(adapters) if a.method.static]
        self.live = [i for i, a in enumerate(adapters) if not a.method.static]
        self.residual = residual
        self.always_fold = False  # ``folding()``: fold even into low-precision weights
        # Low-rank factors (B, A) with B A = dW, kept small: a dense dW per adapter and layer would cost as much
        # memory as the targeted weights themselves (about 20 GiB per adapter on FLUX.1-dev in float32).
        self._factors = {i: self._adapter_factors(adapters[i]) for i in self.static}
        self._originals: dict[str, torch.Tensor] = {}
        for i in self.static:
            for p, (B, A) in self._factors[i].items():
                layer = self._linear(p, adapters[i].path)
                if tuple(layer.weight.shape) != (B.shape[0], A.shape[1]):
                    raise UserError(
                        f"{adapters[i].path}: layer {p} changes a {(B.shape[0], A.shape[1])} weight, the model has "
                        f"{tuple(layer.weight.shape)} (different base model or rank?)"
                    )
                if residual is not None and p not in residual:
                    raise UserError(f"residual file has no layer {p} (computed for another model, rank or method?)")
                # The original in its own dtype, on the CPU: re-merging always starts from it.
                self._originals.setdefault(p, layer.weight.detach().to("cpu", copy=True))
        for i in self.live:
            a = adapters[i]
            attach_adapter(model, a.config, a.layers, adapter_name=f"merge_{i}", weight=0.0, source=a.path)

    @staticmethod
    def _adapter_factors(adapter: AdapterFile) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {p: adapter.method.lora_factors(t, adapter.config.scale) for p, t in adapter.layers.items()}

    def _linear(self, path: str, source: str) -> nn.Module:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise UserError(f"{source}: layer {path} does not exist in this model (different base model?)") from None
        return getattr(module, "base_layer", module)

    def _start(self, path: str, original: torch.Tensor, device) -> torch.Tensor:
        """The float32 weight the adapters are added to: ``W`` (delta form) or ``W_res + s * basis`` (residual form)."""
        if self.residual is None:
            return original.to(device, torch.float32, copy=True)
        first = self.adapters[self.static[0]]
        named = next(self.adapters[i].layers[path] for i in self.static if path in self.adapters[i].layers)
        basis = first.method.basis_product({k: v.to(device) for k, v in named.items()})
        return self.residual[path].to(device, torch.float32, copy=True).add_(basis, alpha=first.config.scale)

    @contextlib.contextmanager
    def folding(self):
        """Inside, every merge folds into the weights, whatever their dtype (a merged checkpoint to save)."""
        previous, self.always_fold = self.always_fold, True
        try:
            yield self
        finally:
            self.always_fold = previous

    def _live(self, path: str) -> AdapterLinear | None:
        """The adapter wrapper that carries ``path``'s merged change live, or None where it is folded into the weight
        (a float32 weight, or inside ``folding()``). The wrapper is the model's own (MoE merges, training) or a new one."""
        module = self.model.get_submodule(path)
        base = getattr(module, "base_layer", module)
        if self.always_fold or base.weight.dtype in FOLD_DTYPES:
            if isinstance(module, AdapterLinear):
                _drop_live(module)
            return None
        if not isinstance(module, AdapterLinear):
            parent_name, _, child = path.rpartition(".")
            module = AdapterLinear(base)
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, module)
        return module

    @torch.no_grad()
    def merge(self, weights: Sequence[float]) -> nn.Module:
        """Set the model to ``W + sum_i w_i dW_i`` (one weight per adapter, in the order given); on low-precision
        layers the sum is a live path outside ``folding()`` (module docstring)."""
        if len(weights) != len(self.adapters):
            raise UserError(f"{len(weights)} weights for {len(self.adapters)} adapters")
        for p, original in self._originals.items():
            layer = self._linear(p, "")
            device = layer.weight.device
            terms = [(weights[i], *self._factors[i][p]) for i in self.static if p in self._factors[i] and weights[i] != 0]
            live = self._live(p)
            if live is not None:
                # The weight keeps its start value; the change runs as [w_i B_i] (out x sum k) times [A_i] (sum k x in).
                start = self._start(p, original, device)
                layer.weight.copy_(start)
                if terms:
                    B = torch.cat([w * B for w, B, _ in terms], dim=1).to(device, torch.float32)
                    A = torch.cat([A for _, _, A in terms], dim=0).to(device, torch.float32)
                    live.add_adapter(LIVE_DELTA, LiveDelta(B, A))
                else:
                    _drop_live(live)
                continue
            merged = self._start(p, original, device)  # (out, in) float32, one layer at a time
            for w, B, A in terms:
                merged.addmm_(B.to(device), A.to(device), alpha=w)
            layer.weight.copy_(merged)
        set_adapter_weights(self.model, {f"merge_{i}": weights[i] for i in self.live})
        return self.model

    @torch.no_grad()
    def merge_combined(self, weights: Sequence[float], combine) -> nn.Module:
        """Set each layer to ``W + combine(p, [dW_i], weights)``: a merge rule over the static adapters' dense
        weight changes (one layer at a time, float32), e.g. PEFT's TIES or DARE. Adapters that do not adapt layer
        ``p`` contribute a zero ``dW``."""
        if len(weights) != len(self.adapters):
            raise UserError(f"{len(weights)} weights for {len(self.adapters)} adapters")
        for p, original in self._originals.items():
            layer = self._linear(p, "")
            device = layer.weight.device
            merged = self._start(p, original, device)
            deltas = [self._factors[i][p][0].to(device) @ self._factors[i][p][1].to(device) if p in self._factors[i]
                      else torch.zeros_like(merged) for i in self.static]
            change = combine(p, deltas, [float(weights[i]) for i in self.static])
            live = self._live(p)
            if live is not None:  # the dense combined change, live in the weight's dtype (module docstring)
                layer.weight.copy_(merged)
                live.add_adapter(LIVE_DELTA, LiveDelta(dense=change.to(layer.weight.dtype)))
                continue
            merged += change
            layer.weight.copy_(merged)
        set_adapter_weights(self.model, {f"merge_{i}": weights[i] for i in self.live})
        return self.model

    @torch.no_grad()
    def restore(self) -> nn.Module:
        """Put the original weights back and silence live adapters."""
        for p, original in self._originals.items():
            self._linear(p, "").weight.copy_(original)
        remove_adapters(self.model, [LIVE_DELTA])
        set_adapter_weights(self.model, {f"merge_{i}": 0.0 for i in self.live})
        return self.model
