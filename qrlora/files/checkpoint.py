"""Files users hold (docs/ARCHITECTURE.md s. 2): adapter files and residual files (standard LoRA exports: export.py).

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
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbones import BACKBONES, COMPONENTS, Backbone, backbone_of_layers
from ..errors import UserError
from ..core.layers import adapter_layers
from ..core.methods import FILE_KEY_TO_NAME, METHODS, AdapterConfig, _file_key, get_method
from .outputs import atomic_output

FORMAT_NAME = "qrlora"
FORMAT_VERSION = "1"
ADAPTER_FILENAME = "pytorch_lora_weights.safetensors"


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

    def require_weight_change(self, needs: str, way_out: str = "merge it live with --merge_strategy direct",
                              flag: str | None = None) -> None:
        """Refuse a token-dependent (MoE) adapter where ``needs`` (a sentence: "K-LoRA compares weight changes")
        needs its ``dW``: one line naming the file (after ``flag`` when a flag named it) and the way out
        (``Method.require_weight_change``, the one owner of this refusal)."""
        self.method.require_weight_change(f"{flag} {self.path}" if flag else str(self.path), needs, way_out)

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """``dW`` (out x in, float32) of every layer, from the file alone. Static methods only."""
        self.require_weight_change("folding it into weights needs its weight change")
        return {p: self.method.delta_weight(t, self.config.scale) for p, t in self.layers.items()}


def backbone_of(adapter: AdapterFile, name: str | None = None) -> Backbone:
    """The backbone an adapter was trained on: ``name`` if given, else ``backbones.backbone_of_layers`` (the file's
    ``backbone`` metadata, else its layers).

    Raises:
        UserError: neither names a known backbone (files from the published code carry no metadata).
    """
    found = BACKBONES.get(name) if name else backbone_of_layers(adapter.component, adapter.layers, adapter.backbone)
    if found is None:
        raise UserError(f"{adapter.path}: the file does not say its backbone and its layers fit none; "
                        f"pass --backbone {'|'.join(BACKBONES)}")
    return found


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """``save_file`` into a temporary sibling, then rename over ``path``: readers never see a partial file.

    Raises:
        UserError: naming ``path`` when the write fails (a full disk, a read-only folder); nothing is replaced.
    """
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata or {}))
    except SafetensorError as err:  # the Rust writer reports a full disk as a SafetensorError, not an OSError
        raise UserError(f"{path}: could not be written ({str(err).splitlines()[0]})") from None
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a ``UserError`` naming the file when it is not one."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a safetensors file")
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
    if config.basis != "top" or config.basis_offset:  # study controls only: default files keep their keys
        meta.update(basis=config.basis, basis_offset=str(config.basis_offset), basis_seed=str(config.basis_seed))
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
    if rest.endswith(ALPHA_SUFFIX):  # per-layer alpha of PEFT / kohya-style files: a scalar, no tensor of a method
        return component, rest[: -len(ALPHA_SUFFIX)], ALPHA_NAME
    return component, rest, ""


ALPHA_SUFFIX, ALPHA_NAME = ".alpha", "alpha"
# The metadata key diffusers' ``save_lora_weights`` writes and reads (``diffusers.loaders.lora_base``, same name):
# a JSON object with the PEFT LoraConfig of each component, packed with the component prefix (``transformer.lora_alpha``).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_OUT, _IN = -1, -2  # placeholder layer widths for Method.shapes (real widths are positive)
_alpha_noted: set[str] = set()


def load_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and validate an adapter file: native, published QR-LoRA / SD3 port (no metadata), or diffusers LoRA.

    Every tool reads adapters through here, so every tool refuses the same bad files: tensors that are not
    floating point or hold NaN / inf, shapes that do not fit the method's shapes (``Method.shapes``) at the
    file's rank, metadata of the wrong type or range.

    Raises:
        UserError: one line naming the file, the layer and what is wrong.
    """
    tensors, meta = read_safetensors(path)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, torch.Tensor] = {}
    components = set()
    for key, value in tensors.items():
        component, module_path, name = _split_key(key)
        if not name:
            raise UserError(f"{path}: key '{key}' is not an adapter tensor (is this an adapter file?)")
        if not value.is_floating_point():
            raise UserError(f"{path}: layer {module_path}: {key} has dtype {value.dtype}; adapter tensors are floating point")
        components.add(component or "transformer")
        if name == ALPHA_NAME:
            alphas[module_path] = value
        else:
            layers.setdefault(module_path, {})[name] = value.float()
    if not layers:
        raise UserError(f"{path}: holds no adapter tensors")
    if len(components) > 1:
        raise UserError(f"{path}: mixes components {sorted(components)}; one denoiser per adapter file")
    component = meta.get("component") or components.pop()
    if meta.get("format") == FORMAT_NAME:
        config = _config_from_metadata(path, meta)
    else:
        config = _infer_legacy_config(path, layers, alphas, meta, component)
        meta = {**meta, "format": "qrlora-published", "method": config.method}
    adapter = AdapterFile(config=config, component=component, layers=layers, metadata=meta, path=str(path))
    validate_adapter(adapter)
    return adapter


def _meta_number(path, meta: Mapping[str, str], key: str, kind, default=None):
    """``meta[key]`` parsed as ``kind`` (int or float) and finite; a ``UserError`` naming the key. Ranges are
    ``AdapterConfig``'s (``AdapterConfig.from_file``)."""
    raw = meta.get(key)
    if raw is None or raw == "":
        if default is None:
            raise UserError(f"{path}: metadata '{key}' is missing")
        return default
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise UserError(f"{path}: metadata '{key}' is '{raw}', not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise UserError(f"{path}: metadata '{key}' is {raw}; it must be a finite number")
    return value


def _config_from_metadata(path, meta: Mapping[str, str]) -> AdapterConfig:
    """The ``AdapterConfig`` a native file describes, every field checked for type and range."""
    method = meta.get("method")
    if method not in METHODS:
        raise UserError(f"{path}: metadata 'method' is {method!r}; expected one of {', '.join(METHODS)}")
    alpha = _meta_number(path, meta, "alpha", float)
    zero_init = meta.get("use_zero_init", "true")
    if zero_init not in ("true", "false"):
        raise UserError(f"{path}: metadata 'use_zero_init' is '{zero_init}', not true or false")
    return AdapterConfig.from_file(  # the ranges are AdapterConfig's (one owner); errors name this file
        path,
        method=method,
        rank=_meta_number(path, meta, "rank", int),
        alpha=alpha,
        use_zero_init=zero_init == "true",
        delta_scale=_meta_number(path, meta, "delta_scale", float, 0.01),
        num_experts=_meta_number(path, meta, "num_experts", int, 8),
        seed=_meta_number(path, meta, "seed", int, 0),
        basis=meta.get("basis"),  # absent: the method's default
        basis_offset=_meta_number(path, meta, "basis_offset", int, 0),
        basis_seed=_meta_number(path, meta, "basis_seed", int, 0),
    )


def validate_adapter(adapter: AdapterFile) -> None:
    """Every layer holds exactly the method's tensors, finite, with the method's shapes at the file's rank.

    The registry is asked for the shapes with placeholder widths (``_OUT``, ``_IN``); the layer's real widths
    are read from the tensors at those places, then every tensor must equal ``Method.shapes(out, in, config)``.
    """
    method, cfg, path = adapter.method, adapter.config, adapter.path
    placeholders = method.shapes(_OUT, _IN, cfg)
    for layer, named in adapter.layers.items():
        missing = [n for n in method.tensor_names if n not in named]
        if missing:
            raise UserError(f"{path}: layer {layer} lacks {', '.join(missing)} for method {method.name}")
        extra = [n for n in named if n not in method.tensor_names]
        if extra:
            raise UserError(f"{path}: layer {layer} holds {', '.join(extra)}, which method {method.name} does not use")
        widths: dict[int, int] = {}
        for name, dims in placeholders.items():
            shape = tuple(named[name].shape)
            if len(shape) != len(dims):
                raise UserError(f"{path}: layer {layer}: {name} is {len(shape)}-D {shape}, method {method.name} needs {len(dims)}-D")
            for dim, size in zip(dims, shape):
                if dim in (_OUT, _IN):
                    widths.setdefault(dim, size)
        out_features, in_features = widths.get(_OUT, 0), widths.get(_IN, 0)
        if out_features < 1 or in_features < 1:
            raise UserError(f"{path}: layer {layer} holds empty tensors (a {out_features} x {in_features} weight)")
        for name, expected in method.shapes(out_features, in_features, cfg).items():
            shape = tuple(named[name].shape)
            if shape != tuple(expected):
                raise UserError(f"{path}: layer {layer}: {name} has shape {shape}, method {method.name} at rank "
                                f"{cfg.rank} needs {tuple(expected)} for a {out_features} x {in_features} weight")
        for name, tensor in named.items():
            if not torch.isfinite(tensor).all():
                raise UserError(f"{path}: layer {layer}: {name} holds NaN or inf values")


def _infer_legacy_config(path, layers, alphas: Mapping[str, torch.Tensor], meta: Mapping[str, str], component: str) -> AdapterConfig:
    """Files without our metadata: published q/base_r/delta_r -> deltaR, + gate -> moe, + q0/r0 -> qr; lora_A/B -> lora."""
    first_path, first = next(iter(layers.items()))
    rank_source = "lora_A" if "lora_A" in first else "base_r"
    if rank_source not in first or first[rank_source].dim() != 2:
        raise UserError(f"{path}: layer {first_path} has no 2-D lora.base_r.weight or lora_A.weight; not an adapter file")
    rank = first[rank_source].shape[0]
    if rank < 1:
        raise UserError(f"{path}: layer {first_path}: {rank_source} is empty (rank 0)")
    method, experts = "deltaR", 8
    if rank_source == "lora_A":
        method = "lora"
    elif "gate_weight" in first:
        method, experts = "moe", first["gate_weight"].shape[0]
    elif "q0" in first:
        method = "qr"
    return AdapterConfig.from_file(path, method=method, rank=rank, alpha=_legacy_alpha(path, alphas, meta, component, rank),
                                   num_experts=experts)


def _legacy_alpha(path, alphas: Mapping[str, torch.Tensor], meta: Mapping[str, str], component: str, rank: int) -> float:
    """alpha of a file without our metadata.

    Per-layer ``.alpha`` keys (PEFT / kohya) first, then the ``lora_alpha`` diffusers writes into
    ``lora_adapter_metadata``; with neither, alpha = rank (the published convention and diffusers' default),
    said once per file.
    """
    if alphas:
        values = {float(v.reshape(-1)[0]) for v in alphas.values() if v.numel() == 1}
        if len(values) != 1 or any(v.numel() != 1 for v in alphas.values()):
            raise UserError(f"{path}: its .alpha keys differ or are not scalars; one alpha per file is supported")
        alpha, source = values.pop(), "its .alpha keys"
    elif LORA_ADAPTER_METADATA_KEY in meta:
        try:
            peft_config = json.loads(meta[LORA_ADAPTER_METADATA_KEY])
            alpha = peft_config.get(f"{component}.lora_alpha", peft_config.get("lora_alpha"))
            file_rank = peft_config.get(f"{component}.r", peft_config.get("r", rank))
        except (ValueError, AttributeError):
            raise UserError(f"{path}: metadata '{LORA_ADAPTER_METADATA_KEY}' is not a JSON object") from None
        if file_rank != rank:
            raise UserError(f"{path}: metadata '{LORA_ADAPTER_METADATA_KEY}' says r = {file_rank}, the tensors have rank {rank}")
        if alpha is None:
            return _alpha_is_rank(path, rank)
        source = f"metadata '{LORA_ADAPTER_METADATA_KEY}'"
    else:
        return _alpha_is_rank(path, rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise UserError(f"{path}: alpha from {source} is {alpha!r}, not a number")  # its range: AdapterConfig
    return float(alpha)


def _alpha_is_rank(path, rank: int) -> float:
    if str(path) not in _alpha_noted:
        _alpha_noted.add(str(path))
        print(f"note: {path}: no alpha in the file; using alpha = rank = {rank} (scale 1)", file=sys.stderr)
    return float(rank)


def base_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A content fingerprint of the base model: JSON ``{layer: Frobenius norm of W}`` over the adapted layers.

    Stored in adapter metadata (``base_fingerprint``) so tools compare base models by their weights, not by the
    path or hub id they were opened from (the same model under two paths is the same model).
    """
    return json.dumps({p: round(float(w.detach().float().norm()), 6) for p, w in sorted(weights.items())})


def fingerprint_difference(first: str | None, second: str | None, rtol: float = 1e-2) -> str | None:
    """The first layer whose base-weight norm differs between two fingerprints (JSON ``{layer: norm}``).

    None when they agree on every common layer, or when either is missing. The tolerance absorbs a base loaded
    in bf16 instead of float32 (relative norm change ~1e-5) but not another model's weights.
    """
    if not first or not second:
        return None
    a, b = json.loads(first), json.loads(second)
    for layer in sorted(set(a) & set(b)):
        if not math.isclose(a[layer], b[layer], rel_tol=rtol):
            return layer
    return None


def adapter_from_model(model: torch.nn.Module, config: AdapterConfig, metadata: Mapping[str, str], *,
                       component: str = "transformer", adapter_name: str = "default") -> AdapterFile:
    """Snapshot the named adapter of ``model`` as an ``AdapterFile`` ready to save.

    When the adapter was initialised here (``inject_adapters``), the metadata also gets ``singular_gap_min``:
    the smallest ``sigma_r / sigma_(r+1)`` over its layers' weights, and ``singular_gap_min_layer``. Below
    ``qrlora.core.decompose.GAP_DEFINED`` (1.01) that layer's top-r subspace, and so its ``Q``, is not defined by the
    weight alone (the file's own ``Q`` and ``R`` still load and merge exactly).
    """
    meta = dict(metadata)
    gaps = {path: layer.adapters[adapter_name].singular_gap for path, layer in adapter_layers(model)
            if adapter_name in layer.adapters and hasattr(layer.adapters[adapter_name], "singular_gap")}
    if gaps:
        layer_name = min(gaps, key=gaps.__getitem__)
        meta.update(singular_gap_min=repr(gaps[layer_name]), singular_gap_min_layer=layer_name)
    return AdapterFile(config=config, component=component, layers=collect_adapter(model, adapter_name), metadata=meta)


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
        layer = key[: -len(RESIDUAL_SUFFIX)]
        if not value.is_floating_point() or value.dim() != 2 or not value.numel():
            raise UserError(f"{path}: layer {layer}: residual {tuple(value.shape)} {value.dtype} is not a 2-D floating weight")
        if not torch.isfinite(value).all():
            raise UserError(f"{path}: layer {layer}: residual holds NaN or inf values")
        out[layer] = value.float()
    return out
