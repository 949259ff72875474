"""Files users hold (ARCHITECTURE.md section 2): adapter files and residual files (standard LoRA exports: export.py).

Adapter file ``pytorch_lora_weights.safetensors``: per adapted module path ``P`` inside the denoiser, keys
``{component}.P.lora.q.weight`` / ``lora.base_r.weight`` / ``lora.delta_r.weight`` (+ ``lora.q0/r0``, ``gate.*``,
or ``lora_A/lora_B`` by method), with metadata that makes the file self-describing (nanoGPT keeps
``model_args`` beside the weights). Files from the published QR-LoRA code and its SD3 port carry no metadata
and load as the ``deltaR`` family (``moe`` when gate keys exist), alpha = rank.

Every write is atomic: a temporary file in the destination folder, then ``os.replace``; an interrupted save
never leaves a truncated file under the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .layers import adapter_layers
from .methods import FILE_KEY_TO_NAME, AdapterConfig, _file_key, get_method

FORMAT_NAME = "qrlora"
FORMAT_VERSION = "1"
ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("transformer", "unet")


@dataclass
class AdapterFile:
    """An adapter in memory: its config, which denoiser component it adapts, and per-layer tensors."""

    config: AdapterConfig
    component: str = "transformer"
    layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = "<memory>"

    @property
    def method(self):
        return get_method(self.config.method)

    @property
    def backbone(self) -> str | None:
        return self.metadata.get("backbone")

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model")

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``dW`` (out x in, float32) of every layer, from the file alone. Static methods only."""
        if not self.method.static:
            raise UserError(f"{self.path}: a {self.config.method} adapter is token-dependent and cannot be folded into weights")
        return {p: self.method.delta_weight(t, self.config.scale) for p, t in self.layers.items()}


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """``save_file`` into a temporary sibling, then rename over ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a ``UserError`` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None
    return tensors, metadata


# ---------------------------------------------------------------------------------------------------------
# Adapter files
# ---------------------------------------------------------------------------------------------------------
def adapter_metadata(config: AdapterConfig, *, component: str, backbone: str | None = None,
                     base_model: str | None = None, targets=None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata written with every adapter file (strings only, as safetensors requires)."""
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "rank": str(config.rank),
        "alpha": repr(config.lora_alpha),
        "num_experts": str(config.num_experts),
        "seed": str(config.seed),
        "use_zero_init": str(config.use_zero_init).lower(),
        "delta_scale": repr(config.delta_scale),
        "component": component,
        "backbone": backbone or "",
        "base_model": base_model or "",
        "target_modules": json.dumps(list(targets or [])),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def collect_adapter(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer tensors of the named adapter on ``model`` (float32, CPU copies)."""
    layers = {}
    for path, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            layers[path] = {k: v.detach().float().cpu().clone() for k, v in layer.adapters[adapter_name].tensors().items()}
    return layers


def save_adapter(path: str | os.PathLike, adapter: AdapterFile) -> Path:
    """Write ``adapter`` in the native format (keys ``{component}.P.<suffix>``, metadata included)."""
    tensors = {
        f"{adapter.component}.{p}.{_file_key(name)}": t for p, named in adapter.layers.items() for name, t in named.items()
    }
    return atomic_save_safetensors(tensors, path, adapter.metadata)


def _split_key(key: str) -> tuple[str, str, str]:
    """``unet.down.0.to_q.lora.q.weight`` -> (``unet``, ``down.0.to_q``, ``q``); unknown keys -> empty name."""
    component, rest = "", key
    head, _, tail = key.partition(".")
    if head in COMPONENTS:
        component, rest = head, tail
    for suffix, name in FILE_KEY_TO_NAME.items():
        if rest.endswith("." + suffix):
            return component, rest[: -len(suffix) - 1], name
    return component, rest, ""


def load_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read a native adapter file, or one from the published QR-LoRA code / SD3 port (no metadata).

    Raises:
        UserError: the file is missing, not safetensors, truncated, or holds no adapter keys.
    """
    tensors, meta = read_safetensors(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    components = set()
    for key, value in tensors.items():
        component, module_path, name = _split_key(key)
        if not name:
            raise UserError(f"{path}: key '{key}' is not an adapter tensor (is this an adapter file?)")
        components.add(component or "transformer")
        layers.setdefault(module_path, {})[name] = value.float()
    if not layers:
        raise UserError(f"{path}: holds no adapter tensors")
    if len(components) > 1:
        raise UserError(f"{path}: mixes components {sorted(components)}; one denoiser per adapter file")
    component = meta.get("component") or components.pop()
    if meta.get("format") == FORMAT_NAME:
        config = AdapterConfig(
            method=meta["method"],
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            use_zero_init=meta.get("use_zero_init", "true") == "true",
            delta_scale=float(meta.get("delta_scale", 0.01)),
            num_experts=int(meta.get("num_experts", 8)),
            seed=int(meta.get("seed", 0)),
        )
    else:
        config = _infer_legacy_config(path, layers)
        meta = {**meta, "format": "qrlora-published", "method": config.method}
    method = get_method(config.method)
    for module_path, named in layers.items():
        missing = [n for n in method.tensor_names if n not in named]
        if missing:
            raise UserError(f"{path}: layer {module_path} lacks {', '.join(missing)} for method {method.name}")
    return AdapterFile(config=config, component=component, layers=layers, metadata=meta, path=str(path))


def _infer_legacy_config(path, layers) -> AdapterConfig:
    """Published files: q/base_r/delta_r -> deltaR, + gate -> moe, + q0/r0 -> qr, lora_A/B -> lora; alpha = rank."""
    first = next(iter(layers.values()))
    if "lora_A" in first:
        return AdapterConfig(method="lora", rank=first["lora_A"].shape[0])
    if "base_r" not in first:
        raise UserError(f"{path}: no lora.base_r.weight keys; not a QR-LoRA adapter file")
    rank = first["base_r"].shape[0]
    if "gate_weight" in first:
        return AdapterConfig(method="moe", rank=rank, num_experts=first["gate_weight"].shape[0])
    if "q0" in first:
        return AdapterConfig(method="qr", rank=rank)
    return AdapterConfig(method="deltaR", rank=rank)


def adapter_from_model(model: torch.nn.Module, config: AdapterConfig, metadata: Mapping[str, str], *,
                       component: str = "transformer", adapter_name: str = "default") -> AdapterFile:
    """Snapshot the named adapter of ``model`` as an ``AdapterFile`` ready to save."""
    return AdapterFile(config=config, component=component, layers=collect_adapter(model, adapter_name), metadata=dict(metadata))


# ---------------------------------------------------------------------------------------------------------
# Residual files
# ---------------------------------------------------------------------------------------------------------
RESIDUAL_SUFFIX = ".residual.weight"


def residuals_from_adapter(adapter: AdapterFile, base_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W_res = W - s * basis_product`` per layer, from the bases stored in ``adapter`` (exact for every method)."""
    out = {}
    for p, named in adapter.layers.items():
        W = base_weights[p].float()
        basis = adapter.method.basis_product(named)
        if basis.shape != W.shape:
            raise UserError(f"{adapter.path}: layer {p} basis {tuple(basis.shape)} does not fit the weight {tuple(W.shape)}")
        out[p] = W - adapter.config.scale * basis
    return out


def save_residual(path: str | os.PathLike, residuals: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a residual file: keys ``P.residual.weight`` (no component prefix)."""
    return atomic_save_safetensors({f"{p}{RESIDUAL_SUFFIX}": w.float() for p, w in residuals.items()}, path, metadata)


def load_residual(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a residual file into ``{P: W_res}``."""
    tensors, _ = read_safetensors(path)
    out = {}
    for key, value in tensors.items():
        if not key.endswith(RESIDUAL_SUFFIX):
            raise UserError(f"{path}: key '{key}' is not a residual ('P.residual.weight'); is this a residual file?")
        out[key[: -len(RESIDUAL_SUFFIX)]] = value.float()
    return out
