"""Find target Linears by suffix (as PEFT does), wrap them with adapters, and report what trains."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import decompose
from ..backbones.base import discarded_linears
from ..errors import UserError
from .layers import AdapterLinear, AdapterState, adapter_layers
from .methods import AdapterConfig, get_method

logger = logging.getLogger("qrlora.inject")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, AdapterLinear))


def matches_target(name: str, pattern: str) -> bool:
    """PEFT's suffix rule: ``attn.to_q`` matches ``transformer_blocks.3.attn.to_q`` but never ``attn.to_q2``."""
    return name == pattern or name.endswith("." + pattern)


def find_target_modules(
    model: nn.Module, patterns: Sequence[str], blocks: Sequence[str] | None = None
) -> list[str]:
    """Paths of the Linears matching any of ``patterns``, optionally only inside the named ``blocks``.

    Linears whose output the model discards (``backbones.base.discarded_linears``: SD3's last
    ``attn.add_q_proj``) are never targets: they would get no gradient.

    Raises:
        UserError: a pattern (``--lora_layers``) or a block (``--lora_blocks``) that matches no Linear the model
            uses.
    """
    discarded = discarded_linears(model)
    names = [n for n, m in model.named_modules() if _is_linear(m) and not n.endswith(".base_layer")]
    if blocks:
        module_names = {n for n, _ in model.named_modules()}
        for block in blocks:
            if block not in module_names:
                raise UserError(f"--lora_blocks: no block named '{block}' in the model")
        names = [n for n in names if any(n.startswith(b + ".") for b in blocks)]
    selected = []
    for pattern in patterns:
        hits = [n for n in names if matches_target(n, pattern)]
        where = f" inside {', '.join(blocks)}" if blocks else ""
        if not hits:
            raise UserError(f"--lora_layers: target '{pattern}' matches no Linear layer{where}")
        hits = [n for n in hits if n not in discarded]
        if not hits:
            raise UserError(f"--lora_layers: target '{pattern}' matches only Linears whose output the model "
                            f"discards{where} (they would never receive a gradient)")
        selected.extend(hits)
    order = {n: i for i, n in enumerate(names)}
    return sorted(set(selected), key=order.__getitem__)


def validated_targets(model: nn.Module, config: AdapterConfig, targets: Sequence[str],
                      blocks: Sequence[str] | None = None) -> list[str]:
    """Target paths for ``config``, checked before any decomposition starts.

    ``AdapterConfig`` has already checked itself (rank, alpha, experts); what is left depends on the model.

    Raises:
        UserError: a target or block that matches nothing, or a rank above ``min(out, in)`` of a layer (named).
    """
    paths = find_target_modules(model, targets, blocks)
    for path in paths:
        out_features, in_features = model.get_submodule(path).weight.shape
        if config.rank > min(out_features, in_features):
            raise UserError(f"--rank {config.rank} exceeds min(out, in) = {min(out_features, in_features)} of layer {path}")
    return paths


@dataclass
class InjectionReport:
    """What an injection adapted: layer paths, trainable parameters, and LoRA's count at the same rank."""

    method: str
    rank: int
    layers: list[str] = field(default_factory=list)
    trainable_params: int = 0
    lora_params: int = 0
    # sigma_r / sigma_(r+1) of the decomposed weights: the smallest, where, and how many are below GAP_DEFINED
    smallest_gap: float = math.inf
    smallest_gap_layer: str = ""
    undefined_gap_layers: int = 0

    def __str__(self) -> str:
        ratio = self.trainable_params / self.lora_params if self.lora_params else float("nan")
        return (
            f"{self.method} rank {self.rank}: {len(self.layers)} layers adapted, "
            f"{self.trainable_params:,} trainable parameters ({ratio:.3f}x LoRA's {self.lora_params:,} at the same rank)"
        )

    def gap_warning(self) -> str | None:
        """The one line to log when some weight does not define its top-r subspace (None when all do)."""
        if not self.undefined_gap_layers:
            return None
        if self.smallest_gap == decompose.GAP_RANK_DEFICIENT:
            return (f"layer {self.smallest_gap_layer}: its weight has rank below {self.rank} (all zero or exactly low "
                    f"rank: sigma_r = 0), so Q there is arbitrary past the weight's rank and the adapter learns in an "
                    f"arbitrary subspace; {self.undefined_gap_layers} of {len(self.layers)} layers have no defined "
                    "top-r subspace (recorded in the adapter file's metadata as singular_gap_min 0.0); lower --rank "
                    "or leave that layer out of --lora_layers")
        return (f"{self.undefined_gap_layers} of {len(self.layers)} layers have sigma_r / sigma_(r+1) below "
                f"{decompose.GAP_DEFINED} at rank {self.rank} (smallest {self.smallest_gap:.5f}, {self.smallest_gap_layer}): "
                "their top-r singular subspace is not defined by the weight (any rounding rotates it), so Q there "
                "is one valid basis, not the basis; the smallest gap is recorded in the adapter file's metadata")


def _wrap(model: nn.Module, path: str) -> AdapterLinear:
    module = model.get_submodule(path)
    if isinstance(module, AdapterLinear):
        return module
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = AdapterLinear(module)
    setattr(parent, child, wrapper)
    return wrapper


def _base_weight(layer: AdapterLinear) -> torch.Tensor:
    base = layer.base_layer
    weight = base.weight
    # Decomposition needs the full-precision weight: a bitsandbytes (quant_state) or int8/uint8 weight can no
    # longer be decomposed exactly, so injection must come before quantization (the trainer's order).
    if hasattr(weight, "quant_state") or weight.dtype in (torch.int8, torch.uint8):
        raise UserError(f"cannot decompose the quantized weight of {type(base).__name__}; inject before quantizing")
    return weight


def inject_adapters(
    model: nn.Module,
    config: AdapterConfig,
    targets: Sequence[str],
    *,
    blocks: Sequence[str] | None = None,
    adapter_name: str = "default",
    progress: bool = False,
    decompose_device: torch.device | str | None = None,
) -> InjectionReport:
    """Wrap every target Linear of ``model`` and initialise a fresh adapter from its weight.

    Decompositions run in float32 from the weight as it is now (call this before any cast of the base model), on
    ``decompose_device`` (default: the weight's device): the trainer passes its accelerator, so a base loaded on
    the host is decomposed on the GPU one layer at a time (minutes of CPU start-up per process at FLUX size
    otherwise, issue 28) and only the adapter's small tensors come back to the weight's device. Freezes the whole
    base model; only the adapters' parameters train.
    """
    method = get_method(config.method)
    paths = validated_targets(model, config, targets, blocks)
    model.requires_grad_(False)
    report = InjectionReport(method=method.name, rank=config.rank)
    for path in tqdm(paths, desc=f"init {method.name}", disable=not progress, unit="layer"):
        layer = _wrap(model, path)
        weight = _base_weight(layer)
        if not bool(torch.isfinite(weight).all()):  # before the SVD: LAPACK fails on it, training would lose to NaN
            bad = int((~torch.isfinite(weight)).sum())
            raise UserError(f"layer {path}: its base weight holds {bad} NaN or Inf values; the model's weight file is "
                            "damaged (or was saved in a precision it overflows): re-download or re-save the model")
        with torch.no_grad(), decompose.recorded_gaps() as gaps:
            tensors = method.initialize(weight if decompose_device is None else weight.to(decompose_device), config, path)
        state = AdapterState(config, tensors).to(weight.device)
        # Kept on the state (not in its tensors) for the adapter file's metadata (checkpoint.adapter_from_model).
        state.singular_gap = min(gaps, default=math.inf)
        layer.add_adapter(adapter_name, state)
        if state.singular_gap < report.smallest_gap:
            report.smallest_gap, report.smallest_gap_layer = state.singular_gap, path
        report.undefined_gap_layers += state.singular_gap < decompose.GAP_DEFINED
        out_features, in_features = weight.shape
        report.layers.append(path)
        report.trainable_params += method.trainable_count(out_features, in_features, config)
        report.lora_params += config.rank * (out_features + in_features)
    if (warning := report.gap_warning()) is not None:
        logger.warning(warning)  # once per injection, i.e. once per training run
    return report


def attach_adapter(
    model: nn.Module,
    config: AdapterConfig,
    layers: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    adapter_name: str = "default",
    weight: float = 1.0,
    trainable: bool = False,
    source: str = "adapter file",
) -> list[str]:
    """Attach an adapter whose tensors are given (from a file), checking every layer exists and fits.

    Raises:
        UserError: naming ``source`` and the layer when a path is missing or a shape does not fit.
    """
    method = get_method(config.method)
    checked = []
    for path, tensors in layers.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise UserError(f"{source}: layer {path} does not exist in this model (different base model?)") from None
        if not _is_linear(module):
            raise UserError(f"{source}: {path} is not a Linear layer in this model")
        out_features, in_features = module.weight.shape
        missing = [n for n in method.tensor_names if n not in tensors]
        if missing:
            raise UserError(f"{source}: layer {path} lacks {', '.join(missing)} for method {method.name}")
        expected = method.shapes(out_features, in_features, config)
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise UserError(
                    f"{source}: {path} {name} has shape {tuple(tensors[name].shape)}, the model needs {shape} "
                    f"(different base model or rank?)"
                )
        checked.append(path)
    for path in checked:
        layer = _wrap(model, path)
        device = layer.base_layer.weight.device
        state = AdapterState(config, dict(layers[path]), trainable=trainable).to(device)
        layer.add_adapter(adapter_name, state, weight)
    return checked


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (adapter parameters only after an injection)."""
    return [p for p in model.parameters() if p.requires_grad]


def set_adapter_weights(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Set the live merge weight of each named adapter on every layer that has it."""
    for _, layer in adapter_layers(model):
        for name, w in weights.items():
            if name in layer.adapters:
                layer.adapter_weights[name] = float(w)


def remove_adapters(model: nn.Module, names: Iterable[str]) -> None:
    """Detach the named adapters from every layer (the base stays wrapped; use ``unwrap_adapters_`` to undo)."""
    for _, layer in adapter_layers(model):
        for name in names:
            if name in layer.adapters:
                del layer.adapters[name]
                layer.adapter_weights.pop(name, None)
