"""Pure float32 math behind every QR-LoRA method: no ``nn`` state, no file or backbone knowledge.

Notation (docs/ARCHITECTURE.md section 1): a Linear weight ``W`` is ``out x in``; rank ``r``; scale
``s = alpha / r``. The *core* is the top-r SVD part of ``W`` divided by ``s``:
``C = U_r diag(S_r / s) V_r^T``, and QR-LoRA (Yang et al., 2025, "QR-LoRA: Efficient and Disentangled
Fine-tuning via QR Decomposition for Customized Generation") factors it as ``C = Q R``.

The published code runs a full SVD of ``W``, forms the dense ``out x in`` core and QR-decomposes it.
Here the QR goes through the small ``r x in`` factor ``B = diag(S_r / s) V_r^T = Q_b R_b``, so
``Q = U_r Q_b`` and ``R = R_b``: one truncated SVD plus ``O((out + in) r^2)`` work, same ``Q`` and ``R``.
Large matrices use a seeded randomized block Krylov iteration (Halko, Martinsson & Tropp, 2011; Musco & Musco,
2015) for the SVD that iterates until its top-r subspace matches the exact one (within a quarter degree wherever the matrix defines it,
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
    iterations: int = 0  # block Krylov iterations the randomized path ran (0: dense SVD)


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


#: ``gap`` of a weight whose rank is below r (all zero, or exactly low rank): ``sigma_r = 0``, so the top-r
#: subspace past the weight's rank is arbitrary (0 / 0, not ``inf``: issue 30). Below ``GAP_DEFINED`` like a tie.
GAP_RANK_DEFICIENT = 0.0


def _gap(S: torch.Tensor, rank: int, shape: tuple[int, int] | None = None) -> float:
    """``S[rank-1] / S[rank]`` (``inf`` when there is no ``(rank+1)``-th value or it is zero); ``GAP_RANK_DEFICIENT``
    when ``S[rank-1]`` itself is zero to rounding (``<= S[0] max(out, in) eps``, ``matrix_rank``'s tolerance)."""
    tolerance = float(S[0]) * max(shape or S.shape) * torch.finfo(torch.float32).eps if S.numel() else 0.0
    if S.numel() < rank or float(S[rank - 1]) <= tolerance:
        return GAP_RANK_DEFICIENT
    if S.numel() <= rank or float(S[rank]) <= 0.0:
        return float("inf")
    return float(S[rank - 1] / S[rank])


def _dense_svd(W: torch.Tensor, rank: int) -> TruncatedSVD:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return TruncatedSVD(U=U[:, :rank], S=S[:rank], Vh=Vh[:rank], gap=_gap(S, rank, tuple(W.shape)))


def _gap_is_undefined(ritz_gap: float, previous_ritz_gap: float) -> bool:
    """Whether the true ``sigma_r / sigma_(r+1)`` is below ``GAP_DEFINED``, judged from the Ritz ratio.

    An unconverged Ritz ratio can sit on either side of the true one (the r-th and (r+1)-th Ritz vectors
    still mix), so it decides only once it has settled: it moved less than 1e-4 in the last iteration and lies
    at least 2e-4 below the threshold. (Measured on matrices with a controlled gap of exactly 1.01: the ratio
    climbs to it from below while the angle shrinks, and settles within 2e-4 only below 1.5 degrees.)
    """
    settled = abs(ritz_gap - previous_ritz_gap) < 1e-4
    return settled and ritz_gap < GAP_DEFINED - 2e-4


def _orthonormal_complement(X: torch.Tensor, KT: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (n x b) of the part of ``X`` (n x b) outside the row span of ``KT`` (d x n, orthonormal).

    Block classical Gram-Schmidt twice ("twice is enough": one pass leaves rounding-level components in the span that
    the second removes); the first pass takes its coefficients ``KT X`` (d x b) from the caller, who has them from
    the Gram matrix. Then Cholesky QR twice within the block (GEMMs and a b x b Cholesky, cheaper than Householder
    and as orthogonal once repeated). The result's components in the span are the remainder's rounding amplified by
    its condition number, so a remainder with ``cond > ~100`` (some of its directions mostly rounding noise, as when
    the Krylov space is nearly invariant) takes Householder QR and one more pass on the orthonormal block instead,
    whose noise directions have almost all their norm outside the span.
    """
    X = X - KT.T @ coefficients
    X = X - KT.T @ (KT @ X)
    Q = X
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(Q.T @ Q)  # (b, b), Q^T Q = L L^T
        diagonal = L.diagonal()
        if int(info) or float(diagonal.min()) < 1e-2 * float(diagonal.max()):  # cond(X) above about 100
            Q, _ = torch.linalg.qr(X)
            Q, _ = torch.linalg.qr(Q - KT.T @ (KT @ Q))
            return Q
        Q = torch.linalg.solve_triangular(L.T, Q, upper=True, left=False)  # Q L^-T
    return Q


def _block_krylov(W: torch.Tensor, rank: int, b: int, seed: int, n_iter: int | None,
                  max_iter: int) -> TruncatedSVD | None:
    """Seeded randomized block Krylov iteration with a b-column Gaussian start, and Rayleigh-Ritz every iteration.

    The Krylov space of ``W^T W`` from the sketch ``W^T Omega`` (Halko, Martinsson & Tropp, 2011, section 4.6;
    Musco & Musco, 2015, "Randomized Block Krylov Methods for Stronger and Faster Approximate Singular Value
    Decomposition") is ``span[W^T Omega, (W^T W) W^T Omega, ..., (W^T W)^q W^T Omega]``. After ``q`` iterations it
    has used as many products with ``W`` as ``q`` power (subspace) iterations, ``2 q + 2`` of b columns, but its
    top-r Ritz subspace and values converge at the rate of a degree-q Chebyshev polynomial rather than
    ``(sigma_(b+1) / sigma_r)^(2q)``: on the benchmark's power-law spectrum it reaches in 4 iterations what subspace
    iteration reaches in about 9.

    The orthonormal basis ``K`` (n x d, ``d = (q + 1) b``, stored as rows ``KT``) spans right singular directions;
    the products ``Z = W K`` (out x d) are kept in float64 blocks, and the Rayleigh-Ritz step is the
    eigendecomposition of their Gram matrix ``Z^T Z = K^T W^T W K = E diag(S^2) E^T`` (d x d): exact in float64 for
    the float32 ``Z``, so the Ritz values ``S`` and vectors (right ``K E``, left ``Z E / S``) are as accurate as an
    SVD of ``Z``, at a fraction of its cost. The left vectors, the ones ``Q`` spans, come from ``Z``, one product
    further along than ``K``: they converge faster (on a spectrum with a dominant ``sigma_1``, where the rounding of
    each product limits the Krylov basis, much faster).

    With ``n_iter`` given, exactly that many iterations run; otherwise at least 2, then until the top-r left subspace
    has converged (the move between two iterations, and the move extrapolated from the observed rate, below
    ``ANGLE_TOLERANCE_DEG``; Krylov convergence is superlinear, its rate improving from one iteration to the next,
    so the linear extrapolation errs on the safe side) or until the gap is known to be below ``GAP_DEFINED`` (nothing to converge to; see
    ``_gap_is_undefined``). Returns None (the caller then takes the dense SVD) when ``max_iter`` iterations or a
    Krylov space of ``n`` dimensions did not get there, or when the result is numerically suspect: a
    rank-deficient ``W`` (a Ritz value ``S_r`` below ``1e-6 S_1``) or a basis that lost orthogonality.
    """
    m, n = W.shape
    blocks = min(max_iter + 1, n // b)  # the Krylov space never exceeds n dimensions
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(m, b, generator=gen, dtype=torch.float32).to(W.device)
    KT = W.new_empty(blocks * b, n)  # (d_max, n): the basis as rows, so that KT[:d] is contiguous
    KT[:b] = torch.linalg.qr(W.T @ omega)[0].T
    Z: list[torch.Tensor] = []  # float64 blocks of W K, (m, b) each
    G = torch.empty(0, 0, dtype=torch.float64, device=W.device)  # Z^T Z, (d, d)
    previous_E, previous_S, previous_move, previous_gap = None, None, None, float("inf")
    q = 0
    while True:
        d = (q + 1) * b
        product = W @ KT[d - b:d].T  # (m, b): W applied to the newest block
        P = product.double()
        cross = torch.cat([Zj.T @ P for Zj in Z] + [P.T @ P])  # (d, b): the new block column of Z^T Z
        G = torch.cat([torch.cat([G, cross[:-b].T]), cross], dim=1)
        Z.append(P)
        done = False
        if n_iter is None or q >= n_iter:
            eigenvalues, E = torch.linalg.eigh(G)  # ascending
            S = eigenvalues.flip(0).clamp_min(0.0).sqrt()  # (d,) Ritz values, descending
            if not float(S[rank - 1]) > 1e-6 * float(S[0]):
                return None  # W is (numerically) of rank below r: its trailing Ritz vectors are noise over ~0
            E = E.flip(1)[:, :rank]  # (d, r): the top-r Ritz vectors in the basis K
            gap = _gap(S, rank, tuple(W.shape))
            if n_iter is not None:
                done = True
            elif q >= 1:
                move = _left_ritz_move_deg(E, S, previous_E, previous_S, G)
                if q >= 2:
                    rate = move / previous_move if previous_move else 1.0
                    remaining = move * rate / (1.0 - rate) if rate < 1.0 else 90.0  # linear convergence: what is left
                    converged = max(move, remaining) < ANGLE_TOLERANCE_DEG
                    done = converged or (q >= 3 and _gap_is_undefined(gap, previous_gap))
                previous_move = move
            previous_E, previous_S, previous_gap = E, S, gap
        if done:
            return _ritz_triplets(KT[:d], Z, E, S, rank, gap, q)
        if q >= max_iter or q + 1 >= blocks:
            return None
        # K^T (W^T W K_new) = Z^T P = cross: the first Gram-Schmidt pass needs no product with the basis.
        KT[d:d + b] = _orthonormal_complement(W.T @ product, KT[:d], cross.to(W.dtype)).T
        q += 1


def _left_ritz_move_deg(E: torch.Tensor, S: torch.Tensor, previous_E: torch.Tensor, previous_S: torch.Tensor,
                        G: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the top-r left Ritz subspaces of two iterations of ``_block_krylov``.

    Computed from the Krylov coefficients, never at full size: the left vectors are ``X = Z E diag(1 / S_r)``
    (out x r, orthonormal), the previous ones ``X' = Z[:, :d'] E' diag(1 / S'_r)`` (``E``: d x r, ``E'``: d' x r),
    so ``X^T X' = diag(1 / S_r) E^T (Z^T Z)[:, :d'] E' diag(1 / S'_r)`` (r x r) has the cosines of the principal
    angles as its singular values. In float64 the largest angle's sine, ``sqrt(1 - cos^2)``, is resolved to about
    1e-8, far below the tolerance.
    """
    rank = E.shape[1]
    cosines = (E.T @ G[:, :previous_E.shape[0]] @ previous_E) / S[:rank].unsqueeze(1) / previous_S[:rank]  # (r, r)
    smallest = min(1.0, float(torch.linalg.svdvals(cosines).min()))
    return math.degrees(math.asin(math.sqrt(1.0 - smallest * smallest)))


def _ritz_triplets(KT: torch.Tensor, Z: list[torch.Tensor], E: torch.Tensor, S: torch.Tensor, rank: int, gap: float,
                   iterations: int) -> TruncatedSVD | None:
    """The top-r Ritz triplets of ``_block_krylov`` as a ``TruncatedSVD`` (None when numerically suspect).

    Right vectors ``K E`` (in x r); left ``Z E / S`` (out x r), with ``Z`` (out x d) in float64 blocks.
    """
    right = KT.T @ E.to(KT.dtype)  # (in, r)
    left = sum(Zj @ E[j * Zj.shape[1]:(j + 1) * Zj.shape[1]] for j, Zj in enumerate(Z)) / S[:rank]  # (out, r), f64
    # The left vectors are orthonormal by construction (E diagonalises Z^T Z); the right ones only as far as K is.
    eye = torch.eye(rank, dtype=torch.float64, device=KT.device)
    if float((right.double().T @ right.double() - eye).abs().max()) > 1e-4:
        return None  # the Krylov basis lost orthogonality, and with it the Rayleigh-Ritz step: do not trust it
    return TruncatedSVD(U=left.to(KT.dtype), S=S[:rank].to(KT.dtype), Vh=right.T, gap=gap, iterations=iterations)


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
    max_iter: int = 12,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``weight`` (out x in) in float32, faithful to the exact top-r subspace.

    The default path is within ``ANGLE_TOLERANCE_DEG`` (far inside 1 degree) of the dense SVD's top-r left
    subspace wherever ``sigma_r / sigma_(r+1) >= GAP_DEFINED``; below that gap no subspace is singled out by
    ``W`` and the result's ``gap`` says so (the caller records it).

    Args:
        weight: the Linear weight, any float dtype; decomposed in float32.
        rank: number of singular triplets, ``1 <= rank <= min(out, in)``.
        n_iter: a fixed number of block Krylov iterations for the randomized path (benchmarks); default:
            adaptive, at least 2, until the top-r subspace converges (see ``_block_krylov``).
        oversample: extra sketch (Krylov block) columns; default ``max(rank // 2, 16)``: the Krylov space grows by
            a block per iteration, so a thinner block than subspace iteration's ``rank`` is enough and cheaper.
        max_iter: the adaptive iteration gives up (dense SVD) after this many iterations, where a Krylov space of
            ``(max_iter + 1) k`` dimensions costs about as much as the dense SVD.
        exact: force (True) or forbid (False) the dense LAPACK SVD; default: dense when ``min(out, in) <=
            DENSE_MAX_DIM`` or the sketch would be at least a quarter of ``min(out, in)`` (the randomized path
            saves nothing there), and when the adaptive iteration has not converged after ``max_iter``.
        seed: seeds the Gaussian sketch, drawn on the CPU so every device sees the same sketch.
    """
    W = _as_float32(weight)
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be between 1 and min(out, in) = {min(m, n)} for a {m}x{n} weight")
    k = min(rank + (oversample if oversample is not None else max(rank // 2, 16)), min(m, n))
    if exact is None:
        exact = min(m, n) <= DENSE_MAX_DIM or 4 * k >= min(m, n)
    result = None if exact else _block_krylov(W, rank, k, seed, n_iter, max_iter)
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
