"""Pure float32 math behind every QR-LoRA method: no ``nn`` state, no file or backbone knowledge.

Notation (docs/ARCHITECTURE.md section 1): a Linear weight ``W`` is ``out x in``; rank ``r``; scale
``s = alpha / r``. The *core* is the top-r SVD part of ``W`` divided by ``s``:
``C = U_r diag(S_r / s) V_r^T``, and QR-LoRA (Yang et al., 2025, "QR-LoRA: Efficient and Disentangled
Fine-tuning via QR Decomposition for Customized Generation") factors it as ``C = Q R``.

The published code runs a full SVD of ``W``, forms the dense ``out x in`` core and QR-decomposes it.
Here the QR goes through the small ``r x in`` factor ``B = diag(S_r / s) V_r^T = Q_b R_b``, so
``Q = U_r Q_b`` and ``R = R_b``: one truncated SVD plus ``O((out + in) r^2)`` work, same ``Q`` and ``R``.
Large matrices use a seeded randomized subspace iteration (Halko, Martinsson & Tropp, 2011) for the SVD that
iterates until its top-r subspace matches the exact one (within a quarter degree wherever the matrix defines it,
``sigma_r / sigma_(r+1) >= 1.01``), small ones an exact SVD; both are deterministic for a given device.
"""
from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch

__all__ = [
    "GAP_DEFINED",
    "TruncatedSVD",
    "principal_angle_deg",
    "truncated_svd",
    "qr_of_core",
    "spectral_slices",
    "fast_ica",
    "ica_of_core",
    "layer_seed",
    "recorded_gaps",
    "optimal_rank_r_error",
]


#: ``sigma_r / sigma_(r+1)`` below this: the top-r subspace is not defined by the matrix (a rounding-level
#: perturbation rotates it), so no algorithm, the published dense SVD included, reproduces it; see ``truncated_svd``.
GAP_DEFINED = 1.01
#: The randomized path iterates until its top-r subspace moves less than this between two iterations (degrees),
#: with the remaining error extrapolated from the observed convergence rate; well inside the 1-degree promise.
ANGLE_TOLERANCE_DEG = 0.25
#: Below this ``min(out, in)`` a dense LAPACK SVD takes milliseconds: exact, and no iteration to trust.
DENSE_MAX_DIM = 512


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-r singular triplets: ``U`` (out x r), ``S`` (r,), ``Vh`` (r x in), singular values descending.

    ``gap`` is ``sigma_r / sigma_(r+1)`` (exact on the dense path, from the converged Ritz values on the
    randomized one; ``inf`` when ``r = min(out, in)`` or ``sigma_(r+1) = 0``). Below ``GAP_DEFINED`` the top-r
    subspace, and so ``Q``, is not determined by ``W``.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    gap: float = float("inf")
    iterations: int = 0  # power iterations the randomized path ran (0: dense SVD)


def layer_seed(seed: int, layer_name: str) -> int:
    """A seed for one layer that is stable across processes and Python runs (``hash()`` is salted, crc32 is not)."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer_name.encode("utf-8"))) % (2**31 - 1)


def _as_float32(weight: torch.Tensor) -> torch.Tensor:
    # Decompose from the weight as loaded, upcast once; never from a bf16/fp16 cast of a cast.
    return weight.detach().to(torch.float32)


def _fix_svd_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the largest-magnitude entry of every column of ``U`` positive (flip the matching row of ``Vh``).

    SVD factors are unique only up to a sign per triplet; fixing it makes ``svd``/``ica`` bases reproducible
    across LAPACK builds. (``Q``/``R`` need no such fix: the QR sign convention below already pins them.)
    """
    idx = U.abs().argmax(dim=0)  # (r,)
    signs = torch.sign(U.gather(0, idx.unsqueeze(0))).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.unsqueeze(1)


def principal_angle_deg(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of orthonormal ``A`` and ``B`` (both m x r).

    Computed as ``asin(||(I - B B^T) A||_2)`` in float64: accurate for small angles, where ``acos`` of the
    cosines would lose them to rounding.
    """
    A64, B64 = A.detach().double(), B.detach().double()
    sine = float(torch.linalg.matrix_norm(A64 - B64 @ (B64.T @ A64), 2))
    return math.degrees(math.asin(min(1.0, sine)))


def _gap(S: torch.Tensor, rank: int) -> float:
    """``S[rank-1] / S[rank]`` (``inf`` when there is no ``(rank+1)``-th value or it is zero)."""
    if S.numel() <= rank or float(S[rank]) <= 0.0:
        return float("inf")
    return float(S[rank - 1] / S[rank])


def _dense_svd(W: torch.Tensor, rank: int) -> TruncatedSVD:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return TruncatedSVD(U=U[:, :rank], S=S[:rank], Vh=Vh[:rank], gap=_gap(S, rank))


def _gap_is_undefined(ritz_gap: float, previous_ritz_gap: float) -> bool:
    """Whether the true ``sigma_r / sigma_(r+1)`` is below ``GAP_DEFINED``, judged from the Ritz ratio.

    An unconverged Ritz ratio can sit on either side of the true one (the r-th and (r+1)-th Ritz vectors
    still mix), so it decides only once it has settled: it moved less than 1e-4 in the last iteration and lies
    at least 2e-4 below the threshold. (Measured on matrices with a controlled gap of exactly 1.01: the ratio
    climbs to it from below while the angle shrinks, and settles within 2e-4 only below 1.5 degrees.)
    """
    settled = abs(ritz_gap - previous_ritz_gap) < 1e-4
    return settled and ritz_gap < GAP_DEFINED - 2e-4


def _subspace_iteration(W: torch.Tensor, rank: int, k: int, seed: int, n_iter: int | None,
                        max_iter: int) -> TruncatedSVD | None:
    """Seeded randomized subspace iteration (Halko, Martinsson & Tropp, 2011) with a k-column sketch.

    Every iteration ends in a Rayleigh-Ritz step: ``W^T Y = V diag(S) Ub^T`` (n x k) gives the Ritz values
    ``S`` and the current top-r left subspace ``Y Ub[:, :r]``, and ``V`` is the next right basis (so the step
    replaces a QR and costs no extra product with ``W``). With ``n_iter`` given, exactly that many iterations run;
    otherwise at least 2, then until the top-r subspace has converged (``ANGLE_TOLERANCE_DEG``, extrapolated from
    the observed rate, which is about ``(sigma_(k+1) / sigma_r)^2`` per iteration) or until the gap is known to
    be below ``GAP_DEFINED`` (nothing to converge to; see ``_gap_is_undefined``). Returns None when ``max_iter`` iterations did not
    converge on a defined gap: the caller then takes the dense SVD.
    """
    m, n = W.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, dtype=torch.float32).to(W.device)
    Y, _ = torch.linalg.qr(W @ omega)  # (m, k), orthonormal
    previous_U, previous_move, previous_gap = None, None, float("inf")
    iterations = 0
    while True:
        V, S, UbT = torch.linalg.svd(W.T @ Y, full_matrices=False)  # (n, k), (k,), (k, k): Y^T W = Ub S V^T
        U = Y @ UbT.T[:, :rank]  # (m, r), orthonormal
        gap = _gap(S, rank)
        if n_iter is not None:
            done = iterations >= n_iter
        elif iterations >= 2:
            move = principal_angle_deg(U, previous_U)
            rate = move / previous_move if previous_move else 1.0
            remaining = move * rate / (1.0 - rate) if rate < 1.0 else 90.0  # linear convergence: what is left
            converged = max(move, remaining) < ANGLE_TOLERANCE_DEG
            done = converged or (iterations >= 3 and _gap_is_undefined(gap, previous_gap))
            previous_move = move
        else:
            done = False
            if previous_U is not None:
                previous_move = principal_angle_deg(U, previous_U)
        if done:
            return TruncatedSVD(U=U, S=S[:rank], Vh=V[:, :rank].T, gap=gap, iterations=iterations)
        if iterations >= max_iter:
            return None
        previous_U, previous_gap = U, gap
        Y, _ = torch.linalg.qr(W @ V)  # (m, k)
        iterations += 1


_GAP_RECORDS: list[list[float]] = []  # open ``recorded_gaps`` contexts, innermost last


@contextlib.contextmanager
def recorded_gaps():
    """Collect the ``gap`` of every ``truncated_svd`` inside the block (a list, filled as they run).

    Lets the caller of a method's ``initialize`` (``qrlora.core.inject``) learn how well the weight defines its top-r
    subspace without the methods passing SVD results around or anyone decomposing twice.
    """
    record: list[float] = []
    _GAP_RECORDS.append(record)
    try:
        yield record
    finally:
        _GAP_RECORDS.remove(record)


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    n_iter: int | None = None,
    oversample: int | None = None,
    exact: bool | None = None,
    seed: int = 0,
    max_iter: int = 24,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``weight`` (out x in) in float32, faithful to the exact top-r subspace.

    The default path is within ``ANGLE_TOLERANCE_DEG`` (far inside 1 degree) of the dense SVD's top-r left
    subspace wherever ``sigma_r / sigma_(r+1) >= GAP_DEFINED``; below that gap no subspace is singled out by
    ``W`` and the result's ``gap`` says so (the caller records it).

    Args:
        weight: the Linear weight, any float dtype; decomposed in float32.
        rank: number of singular triplets, ``1 <= rank <= min(out, in)``.
        n_iter: a fixed number of power iterations for the randomized path (benchmarks); default: adaptive,
            at least 2, until the top-r subspace converges (see ``_subspace_iteration``).
        oversample: extra sketch columns; default ``max(rank, 16)``.
        exact: force (True) or forbid (False) the dense LAPACK SVD; default: dense when ``min(out, in) <=
            DENSE_MAX_DIM`` or the sketch would be at least a quarter of ``min(out, in)`` (the randomized path
            saves nothing there), and when the adaptive iteration has not converged after ``max_iter``.
        seed: seeds the Gaussian sketch, drawn on the CPU so every device sees the same sketch.
    """
    W = _as_float32(weight)
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be between 1 and min(out, in) = {min(m, n)} for a {m}x{n} weight")
    k = min(rank + (oversample if oversample is not None else max(rank, 16)), min(m, n))
    if exact is None:
        exact = min(m, n) <= DENSE_MAX_DIM or 4 * k >= min(m, n)
    result = None if exact else _subspace_iteration(W, rank, k, seed, n_iter, max_iter)
    if result is None:
        result = _dense_svd(W, rank)
    U, Vh = _fix_svd_signs(result.U.contiguous(), result.Vh.contiguous())
    for record in _GAP_RECORDS:
        record.append(result.gap)
    return TruncatedSVD(U=U, S=result.S.contiguous(), Vh=Vh, gap=result.gap, iterations=result.iterations)


def _qr_positive(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """QR of a wide ``r x in`` matrix with the sign convention ``diag(R) >= 0``: ``Q_b`` (r x r), ``R_b`` (r x in)."""
    Qb, Rb = torch.linalg.qr(B, mode="reduced")
    d = torch.sign(torch.diagonal(Rb))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return Qb * d, Rb * d.unsqueeze(1)


def qr_of_core(svd: TruncatedSVD, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` (out x r, orthonormal columns) and upper-trapezoidal ``R`` (r x in) with ``Q R = U_r diag(S_r/s) V_r^T``.

    Only the small factor ``B = diag(S_r / s) V_r^T`` (r x in) is QR-decomposed: ``B = Q_b R_b`` gives
    ``C = U_r Q_b R_b``, and ``U_r Q_b`` is orthonormal because both factors are.
    """
    B = (svd.S / scale).unsqueeze(1) * svd.Vh  # (r, in)
    Qb, Rb = _qr_positive(B)
    return (svd.U @ Qb).contiguous(), Rb.contiguous()


def spectral_slices(rank: int, num_experts: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices of the top-``rank`` spectrum, one per frequency expert (equal sizes)."""
    if num_experts < 1 or rank % num_experts:
        raise ValueError(f"rank {rank} is not divisible by the number of experts {num_experts}")
    size = rank // num_experts
    return [(e * size, (e + 1) * size) for e in range(num_experts)]


def _sym_decorrelate(W: torch.Tensor) -> torch.Tensor:
    """``(W W^T)^{-1/2} W``: the nearest orthogonal matrix, as FastICA's symmetric update needs (float64, r x r)."""
    evals, evecs = torch.linalg.eigh(W @ W.T)
    evals = evals.clamp_min(torch.finfo(W.dtype).tiny)
    return (evecs * evals.rsqrt()) @ evecs.T @ W


def fast_ica(Z: torch.Tensor, seed: int, *, max_iter: int = 200, tol: float = 1e-5) -> torch.Tensor:
    """Symmetric FastICA with the logcosh contrast (Hyvarinen, 1999) on already whitened data.

    Args:
        Z: whitened samples, ``n x r`` with ``Z^T Z / n = I``.
        seed: seeds the random orthogonal start, so the unmixing is reproducible.
    Returns:
        An orthogonal unmixing ``W_ica`` (r x r); the sources are ``Z W_ica^T``.
    """
    Z64 = Z.to(torch.float64)
    n, r = Z64.shape
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    W = _sym_decorrelate(torch.randn(r, r, generator=gen, dtype=torch.float64).to(Z.device))
    for _ in range(max_iter):
        g = torch.tanh(Z64 @ W.T)  # (n, r)
        g_prime_mean = (1.0 - g * g).mean(dim=0)  # (r,)
        W_new = _sym_decorrelate((g.T @ Z64) / n - g_prime_mean.unsqueeze(1) * W)
        converged = (torch.diagonal(W_new @ W.T).abs() - 1.0).abs().max() < tol
        W = W_new
        if converged:
            break
    return W.to(torch.float32)


def ica_of_core(svd: TruncatedSVD, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent components of the top-r part of ``W``: mixing ``A`` (in x r) and sources ``S0`` (out x r).

    The rows of ``W`` are the samples. Whitening is exact from the SVD, ``Z = sqrt(out) U_r``; FastICA finds
    an orthogonal ``W_ica`` with sources ``S0 = Z W_ica^T``; then
    ``A = V_r diag(S_r) W_ica^T / (sqrt(out) s)`` so that ``s S0 A^T = U_r diag(S_r) V_r^T`` exactly.
    """
    n = svd.U.shape[0]
    root_n = float(n) ** 0.5
    Z = svd.U * root_n  # (out, r)
    W_ica = fast_ica(Z, seed)  # (r, r)
    sources = Z @ W_ica.T  # (out, r)
    mixing = (svd.Vh.T * svd.S) @ W_ica.T / (root_n * scale)  # (in, r)
    return mixing.contiguous(), sources.contiguous()


def optimal_rank_r_error(weight: torch.Tensor, rank: int) -> float:
    """``||W - W_r||_F`` for the best rank-r ``W_r`` (Eckart-Young), from the full spectrum: the yardstick."""
    S = torch.linalg.svdvals(_as_float32(weight).to(torch.float64))
    return float(S[rank:].pow(2).sum().sqrt())
