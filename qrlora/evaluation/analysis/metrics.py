"""Similarity metrics (pure functions, float64 internally): :func:`cosine_similarity`, :func:`linear_cka`
(+ :func:`linear_cka_factored` for low-rank ``dW``), :func:`normalized_mutual_information`, the orientation CKA
sees (:func:`cka_view`), all three on one matrix pair (:func:`matrix_similarity`) and statistics over layers
(:func:`summarize`). No plotting, no files.

Rules for degenerate inputs (so no JSON ever holds NaN; ``zero dR`` at initialisation is the common case):

* cosine: a tensor that is all zero has no direction, so its cosine with anything is undefined: None (JSON
  null). :func:`summarize` leaves such layers out of every statistic and counts them (``n_left_out``): a layer
  that never moved (``dW = 0`` in both files) would otherwise count as perfectly aligned and inflate the mean;
* linear CKA: a matrix whose columns are constant over the samples (all zero, in particular) centres to zero;
  both such -> 1.0, exactly one -> 0.0 ("centres to zero": Frobenius norm of the centred matrix at most 1e-6
  times that of the matrix, i.e. zero to float32 precision);
* NMI: if either input is constant (its histogram has a single occupied bin) its entropy is 0 and NMI is 0.0,
  even for two identical constant tensors (there is no information to share).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

METRICS = ("cosine", "cka", "nmi")
DEFAULT_BINS = 64
_ZERO_RTOL = 1e-6  # "centres to zero": ||Xc||_F <= _ZERO_RTOL * ||X||_F


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Cosine of the angle between ``x`` and ``y`` flattened, in [-1, 1].

    Degenerate rule: None when either is all zero (a zero matrix has no direction; see the module doc).
    """
    a, b = _as64(x).reshape(-1), _as64(y).reshape(-1)
    if a.numel() != b.numel():
        raise ValueError(f"cosine_similarity: sizes differ ({a.numel()} vs {b.numel()})")
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na == 0.0 or nb == 0.0:
        return None
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


def summarize(values: Iterable[float | None]) -> dict[str, float]:
    """``mean``, ``std`` (population), ``min``, ``max``, ``abs_mean`` (mean of |v|: for cosine, 0 = orthogonal)
    over the layers that have a value; ``n_layers`` counts those, ``n_left_out`` the None ones (no direction)."""
    given = list(values)
    v = np.asarray([x for x in given if x is not None], dtype=np.float64)
    left_out = len(given) - int(v.size)
    if v.size == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "abs_mean": 0.0, "n_layers": 0,
                "n_left_out": left_out}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "abs_mean": float(np.abs(v).mean()), "n_layers": int(v.size), "n_left_out": left_out}
