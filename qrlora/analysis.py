"""Measure what the paper argues: adapters trained from the same frozen basis are far less alike than LoRAs.

QR-LoRA's claim (Yang et al., 2025) is quantitative: a content and a style adapter trained from the same frozen
``Q`` and ``R`` share ``Q`` and the base ``R`` exactly, while their ``dR`` (and so their weight changes ``dW``)
are far less alike than two plain LoRAs trained on the same two tasks. This module holds everything the
``test/`` analysis scripts need, so the scripts stay argparse plus one call:

* metrics (pure functions, float64 internally): :func:`cosine_similarity`, :func:`linear_cka`
  (+ :func:`linear_cka_factored` for low-rank ``dW``), :func:`normalized_mutual_information`;
* layer order by block depth (:func:`layer_sort_key`, :func:`block_of`): SD3/FLUX joint blocks, then FLUX
  single blocks; SDXL down < mid < up;
* adapter-pair similarity per layer and matrix type (:func:`pair_similarity`), the ``dW`` comparison of a
  QR-LoRA pair against a plain-LoRA pair (:func:`run_compare`), and the ``visualize_qrlora_similarity`` /
  ``analyze_sd3_ica_similarity`` CLI (:func:`add_similarity_arguments`, :func:`run_similarity_cli`);
* MoE expert usage during sampling (:func:`expert_usage`, :func:`run_expert_usage_cli`) and the style vs
  content usage difference (:func:`run_compare_usage_cli`).

Rules for degenerate inputs (so no JSON ever holds NaN; ``zero dR`` at initialisation is the common case):

* cosine: both tensors all zero -> 1.0 (identical); exactly one all zero -> 0.0;
* linear CKA: a matrix whose columns are constant over the samples (all zero, in particular) centres to zero;
  both such -> 1.0, exactly one -> 0.0 ("centres to zero": Frobenius norm of the centred matrix at most 1e-6
  times that of the matrix, i.e. zero to float32 precision);
* NMI: if either input is constant (its histogram has a single occupied bin) its entropy is 0 and NMI is 0.0,
  even for two identical constant tensors (there is no information to share).

Files with NaN or inf values are refused with a ``UserError`` naming the file, layer and tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import ADAPTER_FILENAME, AdapterFile, load_adapter
from .errors import UserError
from .methods import get_method

__all__ = [
    "METRICS",
    "cosine_similarity",
    "linear_cka",
    "linear_cka_factored",
    "normalized_mutual_information",
    "matrix_similarity",
    "layer_sort_key",
    "order_layers",
    "block_of",
    "matrix_types",
    "load_pair",
    "pair_similarity",
    "summarize",
    "add_similarity_arguments",
    "run_similarity",
    "run_similarity_cli",
    "run_compare",
    "expert_usage",
    "add_expert_usage_arguments",
    "run_expert_usage_cli",
    "compare_usage",
    "add_compare_usage_arguments",
    "run_compare_usage_cli",
]

METRICS = ("cosine", "cka", "nmi")
METRIC_TITLES = {"cosine": "Cosine similarity", "cka": "Linear CKA", "nmi": "Normalised mutual information"}
DEFAULT_BINS = 64
_ZERO_RTOL = 1e-6  # "centres to zero": ||Xc||_F <= _ZERO_RTOL * ||X||_F


# =========================================================================================================
# Metrics (pure)
# =========================================================================================================
def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of the angle between ``x`` and ``y`` flattened, in [-1, 1].

    Degenerate rule: both all zero -> 1.0 (identical), exactly one all zero -> 0.0.
    """
    a, b = _as64(x).reshape(-1), _as64(y).reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"cosine_similarity: sizes differ ({a.numel()} vs {b.numel()})")
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(min(1.0, max(-1.0, (torch.dot(a, b).item() / (na * nb)))))


def _centre(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Subtract the column means (over samples = rows); also say whether the result is zero (see module doc)."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc, torch.linalg.matrix_norm(xc).item() <= _ZERO_RTOL * torch.linalg.matrix_norm(x).item()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) of ``x`` (n x p) and ``y`` (n x q): rows are samples, in [0, 1].

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with columns centred over the ``n`` samples;
    invariant to orthogonal transforms and isotropic scaling of either side (not to general invertible maps).
    Uses the ``n x n`` Gram form when that is cheaper (same value). Degenerate rule: a side that centres to
    zero (constant columns, all zero in particular): both -> 1.0, one -> 0.0.
    """
    x, y = _as64(x), _as64(y)
    if x.dim() == 1:
        x = x[:, None]
    if y.dim() == 1:
        y = y[:, None]
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: sample counts differ ({x.shape[0]} vs {y.shape[0]})")
    xc, x_zero = _centre(x)
    yc, y_zero = _centre(y)
    if x_zero or y_zero:
        return 1.0 if x_zero and y_zero else 0.0
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n * n * (p + q) < n * (p * p + q * q + p * q):
        k, l = xc @ xc.T, yc @ yc.T  # sample Grams, n x n
        num = (k * l).sum()
        den = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    else:
        num = torch.linalg.matrix_norm(yc.T @ xc) ** 2
        den = torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)
    return _unit(num.item() / den.item()) if den.item() > 0 else 0.0


def linear_cka_factored(lx: torch.Tensor, rx: torch.Tensor, ly: torch.Tensor, ry: torch.Tensor) -> float:
    """:func:`linear_cka` of ``X = lx @ rx`` and ``Y = ly @ ry`` without forming them.

    ``lx`` (n x kx), ``rx`` (kx x p); same for ``y``. Centring acts on the rows of ``lx`` only, and every
    Frobenius norm becomes a trace of small ``k x k`` products: with ``M = Lxc^T Lyc``, ``Px = rx rx^T``,
    ``||Xc^T Yc||_F^2 = tr(M^T Px M Py)``. Cost ``O((n + p) k^2)`` instead of ``O(n p min(n, p))``: a 3072 x 3072
    ``dW`` of rank 64 costs milliseconds on a CPU. Same degenerate rule as :func:`linear_cka`.
    """
    lx, rx, ly, ry = map(_as64, (lx, rx, ly, ry))
    lxc, lyc = lx - lx.mean(0, keepdim=True), ly - ly.mean(0, keepdim=True)
    px, py = rx @ rx.T, ry @ ry.T
    gx, gy = lxc.T @ lxc, lyc.T @ lyc

    def sq_norm(g, p):  # ||L R||_F^2 = tr(L^T L R R^T)
        return max(0.0, (g * p.T).sum().item())

    x_zero = sq_norm(gx, px) <= _ZERO_RTOL**2 * sq_norm(lx.T @ lx, px)
    y_zero = sq_norm(gy, py) <= _ZERO_RTOL**2 * sq_norm(ly.T @ ly, py)
    if x_zero or y_zero:
        return 1.0 if x_zero and y_zero else 0.0
    m = lxc.T @ lyc
    num = ((m.T @ px @ m) * py.T).sum().item()
    xx = ((gx @ px) * (gx @ px).T).sum().item()  # tr(Gx Px Gx Px)
    yy = ((gy @ py) * (gy @ py).T).sum().item()
    den = math.sqrt(max(xx, 0.0) * max(yy, 0.0))
    return _unit(num / den) if den > 0 else 0.0


def _unit(v: float) -> float:
    """Clamp a similarity that is mathematically in [0, 1] (rounding can step just outside)."""
    return float(min(1.0, max(0.0, v))) if math.isfinite(v) else 0.0


def _bin_indices(v: torch.Tensor, bins: int) -> torch.Tensor | None:
    lo, hi = v.min(), v.max()
    if not hi > lo:
        return None  # constant: one occupied bin, zero entropy
    return (v - lo).mul_(bins / (hi - lo)).to(torch.int64).clamp_(0, bins - 1)


def _entropy(counts: torch.Tensor) -> float:
    p = counts[counts > 0].double()
    p = p / p.sum()
    return float(-(p * p.log()).sum().item())


def normalized_mutual_information(x: torch.Tensor, y: torch.Tensor, bins: int = DEFAULT_BINS) -> float:
    """NMI of the values of ``x`` and ``y`` (flattened, paired by position), in [0, 1].

    Histogram estimate: each variable is cut into ``bins`` equal-width bins over its own [min, max]; from the
    joint histogram, ``NMI = I(X;Y) / sqrt(H(X) H(Y))`` with ``I = H(X) + H(Y) - H(X,Y)`` (natural logs; the
    normalisation is the geometric mean of the entropies, Strehl & Ghosh, 2002). Identical inputs give 1;
    independent inputs give ~0 (the plug-in estimate is biased upwards by about ``bins^2 / (2 N)`` nats).
    Degenerate rule: a constant input has zero entropy and gives 0.0.
    """
    if bins < 2:
        raise ValueError("normalized_mutual_information: bins must be at least 2")
    a, b = x.detach().reshape(-1).float(), y.detach().reshape(-1).float()
    if a.numel() != b.numel():
        raise ValueError(f"normalized_mutual_information: sizes differ ({a.numel()} vs {b.numel()})")
    ia, ib = _bin_indices(a, bins), _bin_indices(b, bins)
    if ia is None or ib is None:
        return 0.0
    joint = torch.bincount(ia.mul_(bins).add_(ib), minlength=bins * bins).reshape(bins, bins)
    hx, hy, hxy = _entropy(joint.sum(1)), _entropy(joint.sum(0)), _entropy(joint.reshape(-1))
    if hx <= 0.0 or hy <= 0.0:
        return 0.0
    return _unit((hx + hy - hxy) / math.sqrt(hx * hy))


def cka_view(t: torch.Tensor, is_delta_weight: bool = False) -> torch.Tensor:
    """The orientation CKA sees (rows = samples).

    ``dW`` (out x in) and the ``r x in`` factors (``R``, ``dR``, LoRA ``A``, the MoE gate) are transposed, so
    the samples are the input dimension and the features the rank components / outputs. Tall factors
    (``Q`` out x r, ICA ``A`` in x r, ``S0``/``dS`` out x r, LoRA ``B``) are used as they are: the long
    dimension is always the sample dimension. 1-D tensors become one column.
    """
    if t.dim() == 1:
        return t[:, None]
    if is_delta_weight or t.shape[0] < t.shape[1]:
        return t.T
    return t


def matrix_similarity(x: torch.Tensor, y: torch.Tensor, *, bins: int = DEFAULT_BINS, is_delta_weight: bool = False,
                      factors: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                      metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """``{"cosine", "cka", "nmi"}`` (or the subset ``metrics``) of two same-shaped matrices (CKA on :func:`cka_view`).

    ``factors`` = ``((B1, A1), (B2, A2))`` with ``x = B1 A1``: CKA of the ``dW`` pair goes through
    :func:`linear_cka_factored` when that is cheaper (``dW^T = A^T B^T``).
    """
    out = {}
    if "cosine" in metrics:
        out["cosine"] = cosine_similarity(x, y)
    if "cka" in metrics:
        rank = max(f[1].shape[0] for f in factors) if factors is not None and is_delta_weight else None
        if rank is not None and 4 * rank < min(x.shape):
            # dW^T = A^T B^T: the factored form is exact and O((out + in) k^2) instead of O(out in min(out, in)).
            (b1, a1), (b2, a2) = factors
            out["cka"] = linear_cka_factored(a1.T, b1.T, a2.T, b2.T)
        else:
            out["cka"] = linear_cka(cka_view(x, is_delta_weight), cka_view(y, is_delta_weight))
    if "nmi" in metrics:
        out["nmi"] = normalized_mutual_information(x, y, bins)
    return out


def summarize(values: Iterable[float]) -> dict[str, float]:
    """``mean``, ``std`` (population), ``min``, ``max``, ``abs_mean`` (mean of |v|: for cosine, 0 = orthogonal)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "abs_mean": 0.0, "n_layers": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "abs_mean": float(np.abs(v).mean()), "n_layers": int(v.size)}


# =========================================================================================================
# Layer order by block depth
# =========================================================================================================
# Top-level container -> (block kind, rank among the model's stages, tick prefix).
_GROUPS = {
    "transformer_blocks": ("joint", 0, "J"),  # SD3 MMDiT blocks, FLUX double-stream blocks
    "single_transformer_blocks": ("single", 1, "S"),  # FLUX single-stream blocks, after the joint ones
    "down_blocks": ("down", 0, "D"),  # SDXL UNet
    "mid_block": ("mid", 1, "M"),
    "up_blocks": ("up", 2, "U"),
}
_OTHER = ("other", 9, "")  # output heads (proj_out, norm_out, conv_out) and anything unknown: after the blocks
# Embedders run before every block.
_INPUT_MODULES = {"pos_embed", "x_embedder", "context_embedder", "time_text_embed", "conv_in", "time_embedding",
                  "add_embedding", "time_proj", "encoder_hid_proj"}
# Within a block: attention before feed-forward, q k v out, then the context (add_*) projections.
_LEAF_ORDER = {name: i for i, name in enumerate((
    "attn", "attn1", "attn2", "ff", "ff_context", "proj_mlp", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "net",
))}
_CONTAINER = re.compile(r"(blocks|attentions|resnets|mid_block)$")


@dataclass(frozen=True)
class BlockInfo:
    """Where a layer sits: block ``kind`` (joint/single/down/mid/up/other), ``label`` (``J3``), ``leaf``."""

    kind: str
    label: str
    leaf: str

    @property
    def short(self) -> str:
        return f"{self.label} {self.leaf}".strip()


def block_of(path: str) -> BlockInfo:
    """``transformer_blocks.3.attn.to_q`` -> joint ``J3`` ``attn.to_q``; ``single_transformer_blocks.5.proj_mlp``
    -> single ``S5``; ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> down ``D1.0.0``."""
    tokens = path.split(".")
    kind, _, prefix = _GROUPS.get(tokens[0], _OTHER)
    if kind == "other":
        return BlockInfo("other", "", path)
    indices, last = [], 0
    for i, tok in enumerate(tokens[:-1]):
        if _CONTAINER.search(tok) and tokens[i + 1].isdigit():
            indices.append(tokens[i + 1])
            last = i + 1
    leaf = ".".join(tokens[last + 1:])
    return BlockInfo(kind, prefix + ".".join(indices), leaf)


def layer_sort_key(path: str) -> tuple:
    """Sort key that orders layers by depth: stage (joint < single; down < mid < up), block indices
    numerically (``blocks.10`` after ``blocks.9``), then attention before feed-forward, ``q k v out``."""
    tokens = path.split(".")
    _, rank, _ = _GROUPS.get(tokens[0], _OTHER)
    key = [-1 if tokens[0] in _INPUT_MODULES else rank]
    for tok in tokens:
        key.append((0, int(tok), "") if tok.isdigit() else (1, _LEAF_ORDER.get(tok, len(_LEAF_ORDER)), tok))
    return tuple(key)


def order_layers(paths: Iterable[str]) -> list[str]:
    """``paths`` sorted by :func:`layer_sort_key`."""
    return sorted(paths, key=layer_sort_key)


# =========================================================================================================
# Adapter pairs
# =========================================================================================================
# Human names of each method's tensors (ARCHITECTURE.md section 2), in plotting order.
_DISPLAY = {
    "deltaR": (("q", "Q"), ("base_r", "R"), ("delta_r", "dR")),
    "triu_deltaR": (("q", "Q"), ("base_r", "R"), ("delta_r", "dR")),
    "svd": (("q", "U"), ("base_r", "M0"), ("delta_r", "dM")),
    "ica": (("q", "A"), ("base_r", "S0"), ("delta_r", "dS")),
    "moe": (("q", "Q"), ("base_r", "R"), ("delta_r", "dR"), ("gate_weight", "gate")),
    "qr": (("q", "Q"), ("base_r", "R"), ("q0", "Q0"), ("r0", "R0")),
    "lora": (("lora_A", "A"), ("lora_B", "B")),
}
DELTA_WEIGHT = "dW"


def matrix_types(method1: str, method2: str) -> list[tuple[str, str | None]]:
    """``[(display name, tensor name or None for dW)]`` comparable between two adapters' methods.

    Same method: every stored matrix (``Q, R, dR`` ...) plus ``dW`` when the method is static. Different
    methods: only ``dW`` (both must be static).
    """
    m1, m2 = get_method(method1), get_method(method2)
    types: list[tuple[str, str | None]] = []
    if m1.name == m2.name:
        types += [(disp, name) for name, disp in _DISPLAY.get(m1.name, tuple((n, n) for n in m1.tensor_names))]
    if m1.static and m2.static:
        types.append((DELTA_WEIGHT, None))
    return types


def _check_finite(adapter: AdapterFile, layers: Iterable[str]) -> None:
    for p in layers:
        for name, t in adapter.layers[p].items():
            if not torch.isfinite(t).all():
                raise UserError(f"{adapter.path}: layer {p} tensor {name} holds NaN or inf values")


def load_pair(path1: str | os.PathLike, path2: str | os.PathLike, *, flag1: str = "--lora1_path",
              flag2: str = "--lora2_path") -> tuple[AdapterFile, AdapterFile, list[str]]:
    """Load two adapter files and their common layers (ordered by depth), or raise a one-line ``UserError``.

    Refused: a file that is not an adapter, different ranks, no layer in common, NaN/inf values.
    """
    a1, a2 = load_adapter(path1), load_adapter(path2)
    if a1.config.rank != a2.config.rank:
        raise UserError(f"{flag2} {path2}: rank {a2.config.rank} differs from {flag1} rank {a1.config.rank}; "
                        "similarity is defined between adapters of the same rank")
    common = order_layers(set(a1.layers) & set(a2.layers))
    if not common:
        raise UserError(f"{flag1} {path1} and {flag2} {path2}: no layer in common "
                        f"(e.g. {order_layers(a1.layers)[0]} vs {order_layers(a2.layers)[0]}); "
                        "were they trained on the same model and target modules?")
    for adapter in (a1, a2):
        extra = len(adapter.layers) - len(common)
        if extra:
            print(f"note: {adapter.path}: {extra} layer(s) not in the other file are left out")
    _check_finite(a1, common)
    _check_finite(a2, common)
    return a1, a2, common


def _matrix(adapter: AdapterFile, layer: str, tensor_name: str | None) -> torch.Tensor:
    t = adapter.layers[layer]
    return adapter.method.delta_weight(t, adapter.config.scale) if tensor_name is None else t[tensor_name]


def _warn_nmi_bias(adapter: AdapterFile, layers: Sequence[str], types, bins: int) -> None:
    """One note when the smallest matrix has too few values for a ``bins x bins`` joint histogram."""
    sizes = [(adapter.layers[l][name].numel() if name else None, disp, l) for l in layers for disp, name in types]
    sizes = [s for s in sizes if s[0] is not None]
    if not sizes:
        return
    n, disp, layer = min(sizes)
    if n < 5 * bins * bins:
        print(f"note: {disp} of {layer} has {n} values for a {bins} x {bins} joint histogram; its NMI is biased "
              f"upwards (independent values score well above 0). --bins {max(2, int(math.sqrt(n / 5)))} or fewer "
              "gives a fairer estimate")


def pair_similarity(a1: AdapterFile, a2: AdapterFile, layers: Sequence[str], *, bins: int = DEFAULT_BINS,
                    types: Sequence[tuple[str, str | None]] | None = None, device: str | torch.device = "cpu",
                    metrics: Sequence[str] = METRICS, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """``{type: {metric: {layer: value}}}`` over ``layers`` (kept in the given order).

    ``types`` defaults to :func:`matrix_types` of the two methods. Raises ``UserError`` naming the layer when
    a matrix's shape differs between the files (different base models).
    """
    types = list(types) if types is not None else matrix_types(a1.config.method, a2.config.method)
    if not types:
        raise UserError(f"{a1.path} ({a1.config.method}) and {a2.path} ({a2.config.method}): no matrix type in "
                        "common (dW needs two static methods)")
    result = {disp: {m: {} for m in metrics} for disp, _ in types}
    if "nmi" in metrics:
        _warn_nmi_bias(a1, layers, types, bins)
    for layer in tqdm(layers, desc="similarity", unit="layer", disable=not progress):
        for disp, name in types:
            x = _matrix(a1, layer, name).to(device)
            y = _matrix(a2, layer, name).to(device)
            if x.shape != y.shape:
                raise UserError(f"layer {layer}: {disp} has shape {tuple(x.shape)} in {a1.path} but "
                                f"{tuple(y.shape)} in {a2.path} (different base models?)")
            factors = None
            if name is None:
                factors = tuple(
                    tuple(f.to(device) for f in a.method.lora_factors(a.layers[layer], a.config.scale)) for a in (a1, a2)
                )
            values = matrix_similarity(x, y, bins=bins, is_delta_weight=name is None, factors=factors, metrics=metrics)
            for metric, v in values.items():
                result[disp][metric][layer] = v
    return result


# =========================================================================================================
# JSON and figures
# =========================================================================================================
def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON; refuses NaN/inf (``allow_nan=False``) so files stay strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    return path


def _output_dir(path: str | os.PathLike) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _figure(figsize):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_KIND_COLORS = {"joint": "#d6e6f5", "single": "#fde2c4", "down": "#d6e6f5", "mid": "#dcf0d5", "up": "#fde2c4",
                "other": "#ececec"}
_KIND_NAMES = {"joint": "joint blocks", "single": "single blocks", "down": "down blocks", "mid": "mid block",
               "up": "up blocks", "other": "other layers"}
_METRIC_LIMITS = {"cosine": (-1.05, 1.05), "cka": (-0.05, 1.05), "nmi": (-0.05, 1.05)}


def _decorate_layers(ax, layers: Sequence[str], *, max_ticks: int = 40) -> list:
    """Shade block kinds behind the curve and label the x axis with block names (``J3``, ``S5``, ``D1.0.0``)."""
    from matplotlib.patches import Patch

    infos = [block_of(p) for p in layers]
    start, handles, seen = 0, [], set()
    for i in range(1, len(infos) + 1):
        if i == len(infos) or infos[i].kind != infos[start].kind:
            kind = infos[start].kind
            ax.axvspan(start - 0.5, i - 0.5, color=_KIND_COLORS.get(kind, "#ececec"), zorder=0, lw=0)
            if kind not in seen:
                seen.add(kind)
                handles.append(Patch(color=_KIND_COLORS.get(kind, "#ececec"), label=_KIND_NAMES.get(kind, kind)))
            start = i
    if len(layers) <= max_ticks:
        ticks, labels = list(range(len(layers))), [info.short for info in infos]
    else:  # one tick per block start, thinned to at most max_ticks
        starts = [i for i in range(len(infos)) if i == 0 or infos[i].label != infos[i - 1].label]
        step = max(1, math.ceil(len(starts) / max_ticks))
        ticks = starts[::step]
        labels = [infos[i].label or infos[i].leaf for i in ticks]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=7 if len(ticks) > 20 else 8)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer, ordered by block depth (J = joint, S = single, D/M/U = down/mid/up)")
    return handles


def _plot_series(ax, layers, values, *, label, color="C0", metric=None, fixed_scale=False):
    xs = np.arange(len(layers))
    ax.plot(xs, values, marker="o", ms=3, lw=1.2, color=color, label=label, zorder=3)
    mean = float(np.mean(values)) if len(values) else 0.0
    ax.axhline(mean, color=color, ls="--", lw=1, alpha=0.8, label=f"mean = {mean:.3f}", zorder=2)
    if metric == "cosine":
        ax.axhline(0.0, color="grey", lw=0.8, zorder=1)
    if fixed_scale and metric in _METRIC_LIMITS:
        ax.set_ylim(*_METRIC_LIMITS[metric])
    ax.grid(True, axis="y", ls=":", alpha=0.7)


def save_line_plot(path, layers, values, *, matrix, metric, names, fixed_scale, dpi=150) -> Path:
    """Per-layer curve of one metric for one matrix type, block kinds shaded."""
    fig = _figure((max(8.0, min(24.0, 0.12 * len(layers) + 6)), 5.0))
    ax = fig.add_subplot()
    _plot_series(ax, layers, values, label=f"{matrix}: {names[0]} vs {names[1]}", metric=metric,
                 fixed_scale=fixed_scale)
    handles = _decorate_layers(ax, layers)
    ax.set_ylabel(METRIC_TITLES[metric])
    ax.set_title(f"{METRIC_TITLES[metric]} of {matrix} per layer ({names[0]} vs {names[1]})")
    line_handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=line_handles + handles, loc="best", fontsize=8)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_histogram(path, values, *, matrix, metric, names, fixed_scale, dpi=150) -> Path:
    """Distribution of one metric over layers for one matrix type."""
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    values = np.asarray(values, dtype=np.float64)
    rng = _METRIC_LIMITS[metric] if fixed_scale else None
    if rng is None and values.size and values.max() - values.min() < 1e-3:
        mid = float(values.mean())
        rng = (mid - 0.05, mid + 0.05)  # all layers (nearly) equal: one visible bar, not a degenerate range
    ax.hist(values, bins=max(5, min(30, values.size // 2 or 1)), range=rng, color="C0", edgecolor="white",
            label=f"{values.size} layers")
    mean = float(values.mean()) if values.size else 0.0
    ax.axvline(mean, color="C3", ls="--", label=f"mean = {mean:.3f}")
    if rng is not None:
        ax.set_xlim(*rng)
    ax.set_xlabel(METRIC_TITLES[metric])
    ax.set_ylabel("number of layers")
    ax.set_title(f"Distribution over layers of the {METRIC_TITLES[metric]} of {matrix}\n({names[0]} vs {names[1]})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_overview(path, layers, result, *, names, fixed_scale, dpi=150) -> Path:
    """One panel per metric, one curve per matrix type: where similarity sits, at a glance."""
    metrics = list(next(iter(result.values())))
    fig = _figure((max(9.0, min(24.0, 0.12 * len(layers) + 7)), 3.2 * len(metrics) + 1))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        for i, matrix in enumerate(result):
            # Distinct markers and dashes: curves that coincide (Q and R at 1; dR and dW, whose cosine and CKA
            # are equal because Q is orthonormal) stay visible on top of each other.
            ax.plot(np.arange(len(layers)), [result[matrix][metric][l] for l in layers], marker="os^Dv<>p"[i % 8],
                    ms=max(2.0, 6.0 - 1.2 * i), lw=1.2, ls=("-", "--", "-.", ":")[i % 4], mfc="none" if i % 2 else None,
                    color=f"C{i}", label=matrix, zorder=3 + i)
        handles = _decorate_layers(ax, layers)
        if fixed_scale:
            ax.set_ylim(*_METRIC_LIMITS[metric])
        ax.set_ylabel(METRIC_TITLES[metric].replace("Normalised mutual information", "NMI"))
        ax.grid(True, axis="y", ls=":", alpha=0.7)
        line_handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=line_handles + handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    for ax in axes[:-1]:
        ax.set_xlabel("")
    fig.suptitle(f"Per-layer similarity of every matrix type: {names[0]} vs {names[1]}")
    fig.savefig(path, dpi=dpi)
    return Path(path)


# =========================================================================================================
# Similarity CLI (visualize_qrlora_similarity.py, analyze_sd3_ica_similarity.py)
# =========================================================================================================
def add_similarity_arguments(parser: argparse.ArgumentParser, *, lora1_name: str = "style",
                             lora2_name: str = "content", output_dir: str = "deltaR_similarity_analysis") -> argparse.ArgumentParser:
    """The published flags (``--lora1_path --lora2_path --lora1_name --lora2_name --output_dir --fixed_scale``)
    plus ``--bins``, ``--device``, ``--dpi`` and the ``--compare`` mode against a plain-LoRA pair."""
    parser.add_argument("--lora1_path", required=True, help="first adapter file (pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora2_path", required=True, help="second adapter file, same rank and base model")
    parser.add_argument("--lora1_name", default=lora1_name, help=f"label of the first adapter (default: {lora1_name})")
    parser.add_argument("--lora2_name", default=lora2_name, help=f"label of the second adapter (default: {lora2_name})")
    parser.add_argument("--output_dir", default=output_dir, help=f"where figures and JSON go (default: {output_dir})")
    parser.add_argument("--fixed_scale", action="store_true",
                        help="fixed metric axes (cosine -1..1, CKA and NMI 0..1) instead of automatic ones")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS,
                        help=f"histogram bins per variable for the NMI estimate (default: {DEFAULT_BINS})")
    parser.add_argument("--device", default="auto", help="torch device for the metrics: auto (cuda if available), cpu, cuda:0 ...")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures (default: 150)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="METRIC",
                        help=f"metrics to compute, any of {' '.join(METRICS)} (default: all; NMI is the slowest)")
    parser.add_argument("--matrices", nargs="+", metavar="TYPE",
                        help="matrix types to compare, e.g. dR dW (default: all the files hold: Q R dR dW for deltaR, "
                             "A S0 dS dW for ica, A B dW for lora, ...)")
    parser.add_argument("--compare", action="store_true",
                        help="paper figure: dW similarity of this pair next to a plain-LoRA pair "
                             "(--baseline1_path/--baseline2_path, trained with --lora_init_method lora)")
    parser.add_argument("--baseline1_path", help="--compare: plain-LoRA adapter trained on the first task")
    parser.add_argument("--baseline2_path", help="--compare: plain-LoRA adapter trained on the second task")
    return parser


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


def _adapter_info(adapter: AdapterFile, name: str, layers: Sequence[str]) -> dict:
    return {"name": name, "path": adapter.path, "method": adapter.config.method, "rank": adapter.config.rank,
            "alpha": adapter.config.lora_alpha, "backbone": adapter.backbone or "", "layers_in_file": len(adapter.layers),
            "layers_compared": len(layers)}


def run_similarity(lora1_path, lora2_path, output_dir, *, names=("style", "content"), fixed_scale=False,
                   bins=DEFAULT_BINS, device="cpu", dpi=150, require_method: Sequence[str] | None = None,
                   metrics: Sequence[str] = METRICS, matrices: Sequence[str] | None = None, progress=True,
                   figures=True) -> dict:
    """The full per-layer analysis of one adapter pair; returns ``all_statistics_summary`` as written.

    Writes into ``output_dir``: ``{T}_{metric}_data.json`` (``{layer: value}`` in depth order) for every
    matrix type ``T`` and metric, ``{T}_{metric}_{fixed|auto}_line.png`` and ``..._hist.png``,
    ``overview_{fixed|auto}.png``, ``all_statistics_summary.json`` (``{T: {metric: {mean, std, min, max,
    abs_mean, n_layers}}}``) and ``analysis_info.json`` (inputs, layer order, block kinds, rules).
    ``metrics`` / ``matrices`` restrict the analysis (``--metrics``, ``--matrices``); ``figures=False`` writes the
    JSON only (for scripted use).
    """
    metrics = _check_metrics(metrics, bins)
    a1, a2, layers = load_pair(lora1_path, lora2_path)
    if require_method:
        for flag, a in (("--lora1_path", a1), ("--lora2_path", a2)):
            if a.config.method not in require_method:
                raise UserError(f"{flag} {a.path}: a {a.config.method} adapter; this analysis is for "
                                f"{'/'.join(require_method)} adapters (use test/visualize_qrlora_similarity.py)")
    types = matrix_types(a1.config.method, a2.config.method)
    if matrices:
        available = [disp for disp, _ in types]
        unknown = [m for m in matrices if m not in available]
        if unknown:
            raise UserError(f"--matrices: {', '.join(unknown)} not available for {a1.config.method}/{a2.config.method} "
                            f"adapters; choose from {', '.join(available)}")
        types = [t for t in types if t[0] in matrices]
    out = _output_dir(output_dir)
    result = pair_similarity(a1, a2, layers, bins=bins, device=device, types=types, metrics=metrics, progress=progress)
    scale = "fixed" if fixed_scale else "auto"
    summary = {}
    plots = [(m, metric) for m in result for metric in metrics]
    for matrix, metric in tqdm(plots, desc="figures", unit="fig", disable=not progress):
        values = result[matrix][metric]
        write_json(out / f"{matrix}_{metric}_data.json", values)
        series = [values[l] for l in layers]
        summary.setdefault(matrix, {})[metric] = summarize(series)
        if not figures:
            continue
        save_line_plot(out / f"{matrix}_{metric}_{scale}_line.png", layers, series, matrix=matrix, metric=metric,
                       names=names, fixed_scale=fixed_scale, dpi=dpi)
        save_histogram(out / f"{matrix}_{metric}_{scale}_hist.png", series, matrix=matrix, metric=metric, names=names,
                       fixed_scale=fixed_scale, dpi=dpi)
    if figures:
        save_overview(out / f"overview_{scale}.png", layers, result, names=names, fixed_scale=fixed_scale, dpi=dpi)
    write_json(out / "all_statistics_summary.json", summary)
    write_json(out / "analysis_info.json", {
        "lora1": _adapter_info(a1, names[0], layers), "lora2": _adapter_info(a2, names[1], layers),
        "matrix_types": list(result), "metrics": list(metrics), "bins": bins, "layers": list(layers),
        "block_kinds": [block_of(l).kind for l in layers],
        "rules": "cosine: both zero -> 1, one zero -> 0; CKA on transposed r x in factors and dW (samples = input "
                 "dimension), tall factors as stored; CKA: both centre to zero -> 1, one -> 0; NMI = I/sqrt(H(X)H(Y)) "
                 "from a bins x bins joint histogram, constant input -> 0",
    })
    _print_summary(summary, names, metrics)
    print(f"wrote {len(plots) * 2 + 1 if figures else 0} figures and {len(plots) + 2} JSON files to {out}")
    return summary


def _check_metrics(metrics: Sequence[str], bins: int) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    if bins < 2:
        raise UserError(f"--bins: must be at least 2, got {bins}")
    return [m for m in METRICS if m in metrics]


def _print_summary(summary: Mapping[str, Mapping[str, Mapping[str, float]]], names, metrics=METRICS) -> None:
    print(f"\nsimilarity {names[0]} vs {names[1]} (mean +- std over layers)")
    print(f"{'matrix':<8}" + "".join(f"{m:>20}" for m in metrics))
    for matrix, per_metric in summary.items():
        cells = "".join(f"{per_metric[m]['mean']:>12.4f} +- {per_metric[m]['std']:<5.3f}" for m in metrics)
        print(f"{matrix:<8}{cells}")


def run_compare(qr_paths: Sequence[str], baseline_paths: Sequence[str], output_dir, *, names=("style", "content"),
                fixed_scale=False, bins=DEFAULT_BINS, device="cpu", dpi=150, metrics: Sequence[str] = METRICS,
                progress=True) -> dict:
    """The paper's central figure: per-layer similarity of ``dW`` for a QR-LoRA pair next to a LoRA pair.

    Writes ``dW_comparison.png`` (rows: metrics; columns: the two pairs; shared y axis per metric) and
    ``dW_comparison.json``: ``{"pairs": [{label, method, rank, paths, per_layer: {metric: {layer: v}},
    summary: {metric: stats}}], "summary_table": {metric: {pair label: stats}}, "ratio_abs_mean":
    {metric: QR pair abs_mean / LoRA pair abs_mean}}``. Prints the summary table.
    """
    metrics = _check_metrics(metrics, bins)
    pairs = []
    for (p1, p2), (f1, f2) in ((qr_paths, ("--lora1_path", "--lora2_path")),
                               (baseline_paths, ("--baseline1_path", "--baseline2_path"))):
        a1, a2, layers = load_pair(p1, p2, flag1=f1, flag2=f2)
        for flag, a in ((f1, a1), (f2, a2)):
            if not a.method.static:
                raise UserError(f"{flag} {a.path}: a {a.config.method} adapter is token-dependent and has no dW to compare")
        per_layer = pair_similarity(a1, a2, layers, bins=bins, device=device, progress=progress, metrics=metrics,
                                    types=[(DELTA_WEIGHT, None)])[DELTA_WEIGHT]
        method = a1.config.method if a1.config.method == a2.config.method else f"{a1.config.method}/{a2.config.method}"
        label = "LoRA" if method == "lora" else f"QR-LoRA ({method})" if method in _DISPLAY else method
        pairs.append({"label": label, "method": method, "rank": a1.config.rank, "paths": [a1.path, a2.path],
                      "names": list(names), "layers": list(layers), "per_layer": per_layer,
                      "summary": {m: summarize(per_layer[m][l] for l in layers) for m in metrics}})
    if pairs[0]["label"] == pairs[1]["label"]:
        pairs[0]["label"] += " [pair 1]"
        pairs[1]["label"] += " [pair 2]"
    out = _output_dir(output_dir)
    table = {m: {p["label"]: p["summary"][m] for p in pairs} for m in metrics}
    ratio = {}
    for m in metrics:
        base = pairs[1]["summary"][m]["abs_mean"]
        ratio[m] = pairs[0]["summary"][m]["abs_mean"] / base if base > 0 else None
    save_compare_figure(out / f"dW_comparison_{'fixed' if fixed_scale else 'auto'}.png", pairs, names=names,
                        fixed_scale=fixed_scale, dpi=dpi, metrics=metrics)
    payload = {"pairs": pairs, "summary_table": table, "ratio_abs_mean": ratio, "bins": bins, "metrics": metrics}
    write_json(out / "dW_comparison.json", payload)
    print(f"\ndW similarity, {names[0]} vs {names[1]} (mean +- std over layers; |mean| = mean of absolute values)")
    print(f"{'metric':<8}" + "".join(f"{p['label']:>34}" for p in pairs) + f"{'ratio of |mean|':>18}")
    for m in metrics:
        cells = "".join(f"{p['summary'][m]['mean']:.4f} +- {p['summary'][m]['std']:.4f} (|{p['summary'][m]['abs_mean']:.4f}|)".rjust(34)
                        for p in pairs)
        r = "n/a" if ratio[m] is None else f"{ratio[m]:.3f}"
        print(f"{m:<8}{cells}{r:>18}")
    print(f"wrote {out / 'dW_comparison.json'} and the figure")
    return payload


def save_compare_figure(path, pairs, *, names, fixed_scale, dpi=150, metrics: Sequence[str] = METRICS) -> Path:
    """Rows: cosine, CKA, NMI of ``dW``; columns: the QR-LoRA pair and the LoRA pair; shared y per row."""
    widest = max(len(p["layers"]) for p in pairs)
    fig = _figure((2 * max(6.0, min(14.0, 0.1 * widest + 5)), 3.2 * len(metrics) + 1.2))
    axes = fig.subplots(len(metrics), len(pairs), sharey="row", squeeze=False)
    for row, metric in enumerate(metrics):
        for col, pair in enumerate(pairs):
            ax = axes[row][col]
            layers = pair["layers"]
            _plot_series(ax, layers, [pair["per_layer"][metric][l] for l in layers], label=pair["label"],
                         color=f"C{col}", metric=metric, fixed_scale=fixed_scale)
            handles = _decorate_layers(ax, layers, max_ticks=30)
            if row < len(metrics) - 1:  # every row of a column has the same layers: name them once, at the bottom
                ax.set_xlabel("")
                ax.tick_params(labelbottom=False)
            if row == 0:
                ax.set_title(f"{pair['label']}, rank {pair['rank']}")
            if col == 0:
                ax.set_ylabel(f"{METRIC_TITLES[metric]}\nof dW".replace("Normalised mutual information", "NMI"))
            line_handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=line_handles + handles, loc="best", fontsize=7)
    fig.suptitle(f"Similarity of the weight changes dW per layer: {names[0]} vs {names[1]}\n"
                 "lower = more disentangled", fontsize=12)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def run_similarity_cli(args: argparse.Namespace, *, require_method: Sequence[str] | None = None) -> dict:
    """Dispatch parsed :func:`add_similarity_arguments` flags to :func:`run_similarity` or :func:`run_compare`."""
    device = _resolve_device(args.device)
    names = (args.lora1_name, args.lora2_name)
    common = dict(names=names, fixed_scale=args.fixed_scale, bins=args.bins, device=device, dpi=args.dpi,
                  metrics=args.metrics)
    if args.compare:
        missing = [f for f, v in (("--baseline1_path", args.baseline1_path), ("--baseline2_path", args.baseline2_path)) if not v]
        if missing:
            raise UserError(f"--compare needs {' and '.join(missing)} (the plain-LoRA pair)")
        return run_compare((args.lora1_path, args.lora2_path), (args.baseline1_path, args.baseline2_path),
                           args.output_dir, **common)
    if args.baseline1_path or args.baseline2_path:
        raise UserError("--baseline1_path/--baseline2_path: only used with --compare")
    return run_similarity(args.lora1_path, args.lora2_path, args.output_dir, require_method=require_method,
                          matrices=args.matrices, **common)


# =========================================================================================================
# MoE expert usage (analyze_moe_experts.py)
# =========================================================================================================
@dataclass
class ExpertUsage:
    """Mean gate weight per expert: ``per_step[layer][step]`` is an E-vector averaged over tokens and calls."""

    layers: list[str]
    num_experts: int
    per_step: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return max((len(v) for v in self.per_step.values()), default=0)

    def layer_mean(self) -> dict[str, list[float]]:
        """``{layer: [E]}``: the per-step means averaged over steps."""
        return {l: np.mean(np.asarray(self.per_step[l]), axis=0).tolist() for l in self.layers}

    def step_mean(self) -> list[list[float]]:
        """``[step][E]``: averaged over layers."""
        return np.mean(np.asarray([self.per_step[l] for l in self.layers]), axis=0).tolist()


def expert_usage(pipe, denoiser: torch.nn.Module, prompts: Sequence[str], *, adapter_name: str = "moe",
                 num_inference_steps: int = 10, guidance_scale: float = 0.0, height: int | None = None,
                 width: int | None = None, seed: int = 0, progress: bool = True) -> ExpertUsage:
    """Run ``pipe`` on ``prompts`` and record every MoE layer's softmax gate weights per denoising step.

    A forward pre-hook on each ``AdapterLinear`` holding ``adapter_name`` computes the gate probabilities of
    its input (``method.gate_probabilities``, (..., E)), averages them over every token of the batch, and adds
    them to the current step's running sum; the pipeline's ``callback_on_step_end`` advances the step. Each
    (prompt, step) call counts once, so the result is the mean over prompts of the token-mean gate weight.
    """
    from .layers import adapter_layers

    targets = [(p, l) for p, l in adapter_layers(denoiser) if adapter_name in l.adapters]
    if not targets:
        raise UserError(f"no layer holds the adapter '{adapter_name}'")
    if not hasattr(targets[0][1].adapters[adapter_name].method, "gate_probabilities"):
        raise UserError(f"adapter '{adapter_name}' is not an MoE adapter (no gate)")
    num_experts = int(targets[0][1].adapters[adapter_name].tensors()["gate_weight"].shape[0])
    step = [0]
    sums: dict[str, dict[int, torch.Tensor]] = {p: {} for p, _ in targets}
    counts: dict[str, dict[int, int]] = {p: {} for p, _ in targets}

    def make_hook(path, layer):
        state = layer.adapters[adapter_name]

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                t = {k: v.float() for k, v in state.tensors().items()}
                probs = state.method.gate_probabilities(t, x.float()).reshape(-1, num_experts).mean(0)
            s = step[0]
            sums[path][s] = sums[path].get(s, 0) + probs.double()
            counts[path][s] = counts[path].get(s, 0) + 1

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(p, layer), with_kwargs=True) for p, layer in targets]
    bar = tqdm(total=len(prompts) * num_inference_steps, desc="denoising", unit="step", disable=not progress)

    def on_step_end(_pipe, i, _t, callback_kwargs):
        step[0] = i + 1
        bar.update(1)
        return callback_kwargs

    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "output_type": "latent",
              "callback_on_step_end": on_step_end}
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(prompts):
            step[0] = 0
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt=prompt, generator=generator, **kwargs)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    layers = order_layers(p for p, _ in targets)
    usage = ExpertUsage(layers=layers, num_experts=num_experts)
    for p in layers:
        steps = sorted(sums[p])
        usage.per_step[p] = [(sums[p][s] / counts[p][s]).cpu().tolist() for s in steps]
    return usage


def add_expert_usage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Published flags (``--model_path --lora_path --prompt --rank --num_experts --output_dir --device``) and
    ``--prompts_file``, ``--num_inference_steps``, ``--guidance_scale``, ``--height/--width``, ``--seed``,
    ``--dtype``, ``--lora_name``, ``--dpi``."""
    parser.add_argument("--model_path", required=True, help="base pipeline folder or hub id the adapter was trained on")
    parser.add_argument("--lora_path", required=True, help="MoE adapter file (--lora_init_method moe)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (default: 'a dog' if no --prompts_file)")
    parser.add_argument("--prompts_file", help="text file with one prompt per line (added to --prompt)")
    parser.add_argument("--rank", type=int, help="optional check: the adapter's rank must equal this")
    parser.add_argument("--num_experts", type=int, help="optional check: the adapter's expert count must equal this")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="denoising steps per prompt (default: 10)")
    parser.add_argument("--guidance_scale", type=float, default=0.0, help="CFG scale (default: 0.0, no CFG, as published)")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                        help="pipeline dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--lora_name", help="label in titles and JSON (default: the adapter's run folder or file name)")
    parser.add_argument("--output_dir", default="analysis_results", help="where figures and JSON go")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0 ...")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures (default: 150)")
    return parser


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as err:
            raise UserError(f"--prompts_file {args.prompts_file}: cannot read ({err.strerror or err})") from None
        prompts += [l.strip() for l in lines if l.strip()]
        if not prompts:
            raise UserError(f"--prompts_file {args.prompts_file}: holds no prompt")
    return prompts or ["a dog"]


def _load_pipeline(model_path: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if (Path(model_path).is_absolute() or model_path.startswith((".", "~"))) and not Path(model_path).expanduser().exists():
        raise UserError(f"--model_path {model_path}: no such folder")
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; the old name works everywhere we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(model_path, torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--model_path {model_path}: cannot load a diffusers pipeline ({reason})") from None


def run_expert_usage_cli(args: argparse.Namespace) -> dict:
    """Load the pipeline, attach the MoE adapter live, record usage; write the heatmap, step curve and JSON.

    Outputs in ``--output_dir``: ``expert_heatmap.png`` (layers x experts, mean gate weight over prompts and
    steps), ``expert_usage_per_step.png`` (mean over layers per expert vs step) and ``expert_usage.json``:
    ``{adapter, name, model, prompts, num_inference_steps, guidance_scale, seed, num_experts, rank, layers,
    block_kinds, usage: {layer: [E]}, expert_mean: [E], per_step: [[E] per step], per_layer_per_step:
    {layer: [[E] per step]}}``.
    """
    from .inject import attach_adapter

    if args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps: must be positive, got {args.num_inference_steps}")
    prompts = _read_prompts(args)
    adapter = load_adapter(args.lora_path)
    if adapter.config.method != "moe":
        raise UserError(f"--lora_path {args.lora_path}: a {adapter.config.method} adapter; expert usage needs an "
                        "moe adapter (--lora_init_method moe)")
    if args.rank is not None and args.rank != adapter.config.rank:
        raise UserError(f"--rank {args.rank}: the adapter {args.lora_path} has rank {adapter.config.rank}")
    if args.num_experts is not None and args.num_experts != adapter.config.num_experts:
        raise UserError(f"--num_experts {args.num_experts}: the adapter {args.lora_path} has "
                        f"{adapter.config.num_experts} experts")
    device = _resolve_device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    out = _output_dir(args.output_dir)
    pipe = _load_pipeline(args.model_path, dtype)
    denoiser = getattr(pipe, adapter.component, None)
    if denoiser is None:
        raise UserError(f"--model_path {args.model_path}: the pipeline has no {adapter.component}, which "
                        f"{args.lora_path} adapts (different backbone?)")
    attach_adapter(denoiser, adapter.config, adapter.layers, adapter_name="moe", weight=1.0, source=str(args.lora_path))
    pipe.to(device)
    name = args.lora_name or adapter_label(args.lora_path)
    usage = expert_usage(pipe, denoiser, prompts, num_inference_steps=args.num_inference_steps,
                         guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=args.seed)
    means = usage.layer_mean()
    payload = {
        "adapter": str(args.lora_path), "name": name, "model": str(args.model_path), "prompts": prompts,
        "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale, "seed": args.seed,
        "num_experts": usage.num_experts, "rank": adapter.config.rank, "layers": usage.layers,
        "block_kinds": [block_of(l).kind for l in usage.layers], "usage": means,
        "expert_mean": np.mean(np.asarray([means[l] for l in usage.layers]), axis=0).tolist(),
        "per_step": usage.step_mean(), "per_layer_per_step": usage.per_step,
    }
    write_json(out / "expert_usage.json", payload)
    subtitle = f"{len(prompts)} prompt(s), {usage.num_steps} steps"
    save_usage_heatmap(out / "expert_heatmap.png", usage.layers, np.asarray([means[l] for l in usage.layers]),
                       title=f"Mean gate weight per expert: {name}\n{subtitle}", dpi=args.dpi)
    save_step_curve(out / "expert_usage_per_step.png", np.asarray(payload["per_step"]),
                    title=f"Expert usage over denoising steps (mean over {len(usage.layers)} layers): {name}",
                    dpi=args.dpi)
    print("mean gate weight per expert (over layers, prompts, steps):")
    for e, v in enumerate(payload["expert_mean"]):
        print(f"  expert {e}: {v:.4f}")
    print(f"wrote expert_heatmap.png, expert_usage_per_step.png and expert_usage.json to {out}")
    return payload


def adapter_label(path: str | os.PathLike) -> str:
    """A short label for an adapter file: its run folder for trainer outputs (``run`` or ``run/checkpoint-500``
    for ``.../pytorch_lora_weights.safetensors``), else the file name without extension."""
    p = Path(path).resolve()
    if p.name != ADAPTER_FILENAME:
        return p.stem
    if p.parent.name.startswith("checkpoint-"):
        return f"{p.parent.parent.name}/{p.parent.name}"
    return p.parent.name


def _expert_labels(num_experts: int) -> list[str]:
    # Expert e owns the e-th slice of the singular spectrum: 0 = largest singular values (low frequency).
    return [f"E{e}" + (" (top)" if e == 0 and num_experts > 1 else " (tail)" if e == num_experts - 1 and num_experts > 1 else "")
            for e in range(num_experts)]


def _layer_axis(ax, layers: Sequence[str], max_ticks: int = 60) -> None:
    infos = [block_of(l) for l in layers]
    step = max(1, math.ceil(len(layers) / max_ticks))
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([infos[i].short for i in ticks], fontsize=7 if len(ticks) > 30 else 8)
    ax.set_ylabel("layer, ordered by block depth")


def save_usage_heatmap(path, layers, data: np.ndarray, *, title: str, dpi=150, diverging=False,
                       colorbar_label="mean gate weight") -> Path:
    """Heatmap layers (rows, depth order) x experts (columns)."""
    fig = _figure((max(5.0, 1.0 * data.shape[1] + 4), max(4.0, min(40.0, 0.2 * len(layers) + 2))))
    ax = fig.add_subplot()
    if diverging:
        lim = float(np.abs(data).max()) or 1.0
        im = ax.imshow(data, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    else:
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-12),
                       interpolation="nearest")
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set_xticks(range(data.shape[1]))
    ax.set_xticklabels(_expert_labels(data.shape[1]), rotation=45 if data.shape[1] > 4 else 0)
    ax.set_xlabel("expert (singular-spectrum slice: top -> tail)")
    _layer_axis(ax, layers)
    ax.set_title(title)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_step_curve(path, per_step: np.ndarray, *, title: str, dpi=150) -> Path:
    """Mean gate weight per expert (one line each) against the denoising step."""
    fig = _figure((8.0, 4.5))
    ax = fig.add_subplot()
    steps = np.arange(per_step.shape[0])
    for e, label in enumerate(_expert_labels(per_step.shape[1])):
        ax.plot(steps, per_step[:, e], marker="o", ms=3, label=label, color=f"C{e % 10}",
                ls="-" if e < 10 else "--")
    ax.axhline(1.0 / per_step.shape[1], color="grey", ls=":", label="uniform")
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("mean gate weight")
    ax.set_title(title, fontsize=10)
    ax.grid(True, ls=":", alpha=0.7)
    ax.legend(fontsize=8, ncol=2 if per_step.shape[1] > 6 else 1)
    fig.savefig(path, dpi=dpi)
    return Path(path)


# =========================================================================================================
# Style vs content expert usage (compare_expert_usage.py)
# =========================================================================================================
def _load_usage(path: str, flag: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "expert_usage.json"
    try:
        data = json.loads(p.read_text())
    except OSError:
        raise UserError(f"{flag} {p}: no such file (expected expert_usage.json from analyze_moe_experts.py)") from None
    except ValueError:
        raise UserError(f"{flag} {p}: not JSON (expected expert_usage.json from analyze_moe_experts.py)") from None
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict) or "num_experts" not in data:
        raise UserError(f"{flag} {p}: not an expert_usage.json (no 'usage' / 'num_experts')")
    return data


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same usage, 1 = disjoint experts)."""
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return float(min(1.0, max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))))


def compare_usage(content: Mapping, style: Mapping, *, names=("content", "style")) -> dict:
    """Difference (content - style) of two usage records over their common layers, in depth order.

    Returns ``{layers, num_experts, names, global_cosine, per_layer: {layer: {content, style, diff, cosine, jsd}},
    per_expert: {content, style, diff}, layer_cosine: stats, layer_jsd: stats}`` (cosine as
    :func:`cosine_similarity`; ``jsd`` = Jensen-Shannon divergence in bits of the two gate distributions).
    """
    if int(content["num_experts"]) != int(style["num_experts"]):
        raise UserError(f"--style_usage: {style['num_experts']} experts but --content_usage has "
                        f"{content['num_experts']}; compare adapters with the same expert count")
    layers = order_layers(set(content["usage"]) & set(style["usage"]))
    if not layers:
        raise UserError("--content_usage and --style_usage: no layer in common (different base models?)")
    c = np.asarray([content["usage"][l] for l in layers], dtype=np.float64)
    s = np.asarray([style["usage"][l] for l in layers], dtype=np.float64)
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise UserError("--content_usage/--style_usage: usage values hold NaN or inf")
    per_layer = {}
    for i, l in enumerate(layers):
        per_layer[l] = {"content": c[i].tolist(), "style": s[i].tolist(), "diff": (c[i] - s[i]).tolist(),
                        "cosine": cosine_similarity(torch.from_numpy(c[i]), torch.from_numpy(s[i])),
                        "jsd": _jensen_shannon(c[i], s[i])}
    return {
        "names": list(names), "layers": layers, "num_experts": int(content["num_experts"]),
        "global_cosine": cosine_similarity(torch.from_numpy(c), torch.from_numpy(s)),
        "per_layer": per_layer,
        "per_expert": {"content": c.mean(0).tolist(), "style": s.mean(0).tolist(), "diff": (c - s).mean(0).tolist()},
        "layer_cosine": summarize(v["cosine"] for v in per_layer.values()),
        "layer_jsd": summarize(v["jsd"] for v in per_layer.values()),
    }


def add_compare_usage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--content_usage --style_usage`` (expert_usage.json or its folder), names, ``--output_dir``, ``--dpi``."""
    parser.add_argument("--content_usage", required=True, help="expert_usage.json of the content MoE adapter (or its folder)")
    parser.add_argument("--style_usage", required=True, help="expert_usage.json of the style MoE adapter (or its folder)")
    parser.add_argument("--content_name", default="content", help="label of the content adapter")
    parser.add_argument("--style_name", default="style", help="label of the style adapter")
    parser.add_argument("--output_dir", default="analysis_result", help="where the figure and JSON go")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figure (default: 150)")
    return parser


def run_compare_usage_cli(args: argparse.Namespace) -> dict:
    """Write ``usage_difference.png`` (difference heatmap + per-expert bars) and ``usage_comparison.json``."""
    names = (args.content_name, args.style_name)
    result = compare_usage(_load_usage(args.content_usage, "--content_usage"),
                           _load_usage(args.style_usage, "--style_usage"), names=names)
    out = _output_dir(args.output_dir)
    write_json(out / "usage_comparison.json", result)
    layers = result["layers"]
    diff = np.asarray([result["per_layer"][l]["diff"] for l in layers])
    fig = _figure((max(10.0, 1.0 * result["num_experts"] + 9), max(4.5, min(40.0, 0.2 * len(layers) + 2))))
    ax_map, ax_bar = fig.subplots(1, 2, width_ratios=[1.2, 1.0])
    lim = float(np.abs(diff).max()) or 1.0
    im = ax_map.imshow(diff, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax_map, label=f"gate weight: {names[0]} (+) vs {names[1]} (-)")
    ax_map.set_xticks(range(diff.shape[1]))
    ax_map.set_xticklabels(_expert_labels(diff.shape[1]), rotation=45 if diff.shape[1] > 4 else 0)
    ax_map.set_xlabel("expert (singular-spectrum slice: top -> tail)")
    _layer_axis(ax_map, layers)
    ax_map.set_title(f"Usage difference ({names[0]} - {names[1]}) per layer")
    e = np.arange(result["num_experts"])
    ax_bar.bar(e - 0.2, result["per_expert"]["content"], width=0.4, label=names[0], color="C0")
    ax_bar.bar(e + 0.2, result["per_expert"]["style"], width=0.4, label=names[1], color="C1")
    ax_bar.axhline(1.0 / result["num_experts"], color="grey", ls=":", label="uniform")
    ax_bar.set_xticks(e)
    ax_bar.set_xticklabels(_expert_labels(result["num_experts"]), rotation=45 if result["num_experts"] > 4 else 0)
    ax_bar.set_xlabel("expert")
    ax_bar.set_ylabel("mean gate weight over layers")
    top = max(max(result["per_expert"]["content"]), max(result["per_expert"]["style"]), 1.0 / result["num_experts"])
    ax_bar.set_ylim(0.0, 1.3 * top)  # head room for the legend above the bars
    ax_bar.set_title("Mean usage per expert")
    ax_bar.legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle(f"Expert usage, {names[0]} vs {names[1]}: global cosine {result['global_cosine']:.3f}, "
                 f"mean JS divergence {result['layer_jsd']['mean']:.3f} bits")
    fig.savefig(out / "usage_difference.png", dpi=args.dpi)
    print(f"global cosine similarity of usage: {result['global_cosine']:.4f} (1 = identical usage)")
    print(f"per-layer JS divergence: mean {result['layer_jsd']['mean']:.4f}, max {result['layer_jsd']['max']:.4f} bits")
    print(f"{'expert':<8}{names[0]:>12}{names[1]:>12}{'diff':>10}")
    for i in range(result["num_experts"]):
        pe = result["per_expert"]
        print(f"E{i:<7}{pe['content'][i]:>12.4f}{pe['style'][i]:>12.4f}{pe['diff'][i]:>+10.4f}")
    print(f"wrote usage_difference.png and usage_comparison.json to {out}")
    return result
