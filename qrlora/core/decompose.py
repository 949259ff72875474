"""Pure float32 math behind every QR-LoRA method: no ``nn`` state, no file or backbone knowledge.

Notation (docs/ARCHITECTURE.md section 1): a Linear weight ``W`` is ``out x in``; rank ``r``; scale
``s = alpha / r``. The *core* is the top-r SVD part of ``W`` divided by ``s``:
``C = U_r diag(S_r / s) V_r^T``, and QR-LoRA (Yang et al., 2025, "QR-LoRA: Efficient and Disentangled
Fine-tuning via QR Decomposition for Customized Generation") factors it as ``C = Q R``.

The published code runs a full SVD of ``W``, forms the dense ``out x in`` core and QR-decomposes it.
Here the QR goes through the small ``r x in`` factor ``B = diag(S_r / s) V_r^T = Q_b R_b``, so
``Q = U_r Q_b`` and ``R = R_b``: one truncated SVD plus ``O((out + in) r^2)`` work, same ``Q`` and ``R``.
Large matrices use a seeded randomized block Krylov iteration (Halko, Martinsson & Tropp, 2011; Musco & Musco,
2015) for the SVD that iterates until its goals are met, judged from its own Ritz values: an error within 1.0005 of
the optimal rank-r error, and a top-r subspace within a quarter degree of the exact one wherever the matrix defines
it (``sigma_r / sigma_(r+1) >= 1.01``; a gap estimated from above to be below that needs no converged subspace); small
ones an exact SVD; both are deterministic for a given device.
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
#: The randomized path stops once its error ``||W - U_r S_r V_r^T||_F`` is estimated within this factor of the
#: optimal (Eckart-Young) rank-r error: half the 1.001 promise, for the estimate's own uncertainty (measured 1 to 5.5
#: times what is left: the true error is further inside).
ERROR_TOLERANCE = 1.0005
#: The gap estimate of a full iteration (``_gap_upper_bound`` on its ``S_r^2`` history) decides "undefined" on its
#: own only once the error estimate is within this factor (a quarter of the promise): earlier, ``S_r`` is still
#: climbing fast and its extrapolation is not to be trusted (a seeded sweep of about 200 weights: at 1.0005 a gap of 1.01
#: was taken for undefined, and the iteration stopped 42 degrees off; no violation at 1.00025).
GAP_TRUST_ERROR = 1.00025
#: ... and, unless the gap is known to be below ``GAP_DEFINED``, once its top-r subspace is estimated to lie within this
#: many degrees of the converged one (the move between two iterations extrapolated at the observed rate).
ANGLE_TOLERANCE_DEG = 0.25
#: ... and the last move itself below this: a rate taken from one move and the energy's could be wrong.
MOVE_MAX_DEG = 3.0
#: ``sigma_r^2`` is bounded from above by ``S_r^2`` plus this many times its extrapolated remainder (``_remainder``).
GAP_REMAINDER_MARGIN = 2.0
#: Below this ``min(out, in)`` a dense LAPACK SVD takes milliseconds: exact, and no iteration to trust.
DENSE_MAX_DIM = 512


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-r singular triplets: ``U`` (out x r), ``S`` (r,), ``Vh`` (r x in), singular values descending.

    ``gap`` is ``sigma_r / sigma_(r+1)`` (exact on the dense path, the Ritz ratio ``S_r / S_(r+1)`` where the
    randomized one stopped: converged when the subspace is, below ``GAP_DEFINED`` when the stop took the gap for
    undefined; ``inf`` when ``r = min(out, in)`` or ``sigma_(r+1) = 0``). Below ``GAP_DEFINED`` the top-r
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


def _rate(values: list[float], resolution: float) -> float:
    """The convergence rate ``rho = delta / delta_previous`` of the last two increments of a non-decreasing sequence
    (Ritz values of nested Krylov spaces); 0 once the last increment is within ``resolution`` (the rounding of the
    float32 products: converged), ``inf`` with fewer than three terms or increments that do not shrink."""
    if len(values) < 3:
        return math.inf
    delta, previous = values[-1] - values[-2], values[-2] - values[-3]
    if abs(delta) <= resolution:
        return 0.0
    if delta < 0 or previous <= 0 or delta >= previous:
        return math.inf
    return delta / previous


def _remainder(values: list[float], resolution: float) -> float:
    """What a non-decreasing, converging sequence (Ritz values of nested Krylov spaces) still has to climb.

    The last increment extrapolated geometrically at the rate of the last two (``_rate``): ``delta rho / (1 - rho)``;
    ``inf`` while there is no rate to trust; the last increment itself once it is at rounding level. Krylov Ritz
    values converge superlinearly, the rate improving from one iteration to the next, so the geometric extrapolation
    over-estimates what is left (measured on the power law at rank 64: 1.0 to 5.5 times).
    """
    rho = _rate(values, resolution)
    if rho == 0.0:
        return abs(values[-1] - values[-2])
    return (values[-1] - values[-2]) * rho / (1.0 - rho) if rho < 1.0 else math.inf


def _error_ratio_bound(frobenius2: float, energies: list[float]) -> float:
    """An estimate from above of ``||W - W_q||_F / ||W - W_r||_F`` (the rank-r Ritz approximation over the optimal).

    ``W_q = W K E_r E_r^T K^T`` projects the rows of ``W`` onto the top-r right Ritz vectors (orthonormal), so
    ``||W - W_q||_F^2 = ||W||_F^2 - e_q`` with ``e_q = S_1^2 + ... + S_r^2``, the top-r Ritz energy (``energies[-1]``);
    the optimal is ``||W||_F^2 - (sigma_1^2 + ... + sigma_r^2)``, and the Ritz energy climbs to that sum (Ky Fan)
    from below. What it still has to climb is extrapolated by ``_remainder``. A tail at the float32 rounding of
    ``||W||_F^2`` (a weight of rank r to rounding) is as close as float32 gets: ratio 1.
    """
    resolution = 1e-6 * frobenius2
    tail = frobenius2 - energies[-1]  # ||W - W_q||_F^2
    if tail <= resolution:
        return 1.0
    left = _remainder(energies, resolution)
    return math.sqrt(tail / (tail - left)) if left < tail else math.inf


def _gap_upper_bound(lambdas_r: list[float], lambda_r1: float, lambda_1: float) -> float:
    """An estimate from above of ``sigma_r / sigma_(r+1)`` from the Ritz values ``lambda = S^2`` (eigenvalues of
    ``K^T W^T W K``).

    Every Ritz value is below its singular value squared (Cauchy interlacing), so ``lambda_(r+1)`` bounds
    ``sigma_(r+1)^2`` from below, rigorously; ``sigma_r^2`` is bounded from above by ``lambda_r`` plus twice its
    extrapolated remainder (``_remainder``, itself measured 1.0 to 5.5 times what is left). An unconverged Ritz ratio
    ``S_r / S_(r+1)`` alone can sit on either side of the true one (on a gap of exactly 1.01 it climbs to it from
    below), so it never decides.
    """
    if lambda_r1 <= 0.0:
        return math.inf
    left = _remainder(lambdas_r, 1e-7 * lambda_1)
    return math.sqrt((lambdas_r[-1] + GAP_REMAINDER_MARGIN * left) / lambda_r1)


def _orthonormal_complement(XT: torch.Tensor, KT: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows (b x n) spanning the part of the rows of ``XT`` (b x n) outside the row span of ``KT`` (d x n,
    orthonormal rows).

    Block classical Gram-Schmidt twice ("twice is enough": one pass leaves rounding-level components in the span that
    the second removes); the first pass takes its coefficients ``XT KT^T`` (b x d) from the caller, who has them from
    the Gram matrix. Then Cholesky QR twice within the block (GEMMs and a b x b Cholesky, cheaper than Householder
    and as orthogonal once repeated; the triangular solve as a product with the b x b inverse, which Cholesky QR
    only applies to a well-conditioned block). The result's components in the span are the remainder's rounding
    amplified by its condition number, so a remainder with ``cond > ~100`` (some of its directions mostly rounding
    noise, as when the Krylov space is nearly invariant) takes Householder QR and one more pass on the orthonormal
    block instead, whose noise directions have almost all their norm outside the span. Rows, not columns, so that
    every product is with contiguous operands and the result drops into ``KT`` as it is.
    """
    XT = XT - coefficients @ KT
    XT = XT - (XT @ KT.T) @ KT
    QT = XT
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(QT @ QT.T)  # (b, b), Q^T Q = L L^T
        diagonal = L.diagonal()
        if int(info) or float(diagonal.min()) < 1e-2 * float(diagonal.max()):  # cond(X) above about 100
            Q = torch.linalg.qr(XT.T)[0]
            return torch.linalg.qr(Q - KT.T @ (KT @ Q))[0].T
        eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        QT = torch.linalg.solve_triangular(L, eye, upper=False) @ QT  # L^-1 Q^T
    return QT


def _block_krylov(W: torch.Tensor, rank: int, b: int, seed: int, n_iter: int | None,
                  max_iter: int) -> TruncatedSVD | None:
    """Seeded randomized block Krylov iteration with a b-column Gaussian start and Rayleigh-Ritz, stopped by its goals.

    The Krylov space of ``W^T W`` from the sketch ``W^T Omega`` (Halko, Martinsson & Tropp, 2011, section 4.6;
    Musco & Musco, 2015, "Randomized Block Krylov Methods for Stronger and Faster Approximate Singular Value
    Decomposition") is ``span[W^T Omega, (W^T W) W^T Omega, ..., (W^T W)^q W^T Omega]``, ``d = (q + 1) b`` dimensions
    from ``2 q + 2`` products with ``W`` of b columns. Its top-r Ritz subspace and values converge at the rate of a
    degree-q Chebyshev polynomial, so for the same products (the same ``d``) a thinner block and more iterations
    converge much further: on the benchmark's power law at rank 64, 480 products reach an error 1.00001 times the
    optimal with blocks of 40 columns and 1.0009 with blocks of 80. The block may be thinner than r: the space
    holds r Ritz vectors once ``d > r``.

    The orthonormal basis ``K`` (n x d, stored as rows ``KT``) spans right singular directions; the products
    ``Z = W K`` (out x d) are kept in float64 blocks, and the Rayleigh-Ritz step is the eigendecomposition of their
    Gram matrix ``Z^T Z = K^T W^T W K = E diag(S^2) E^T`` (d x d): exact in float64 for the float32 ``Z``, so the
    Ritz values ``S`` and vectors (right ``K E``, left ``Z E / S``) are as accurate as an SVD of ``Z``, at a fraction
    of its cost. The left vectors, the ones ``Q`` spans, come from ``Z``, one product further along than ``K``: they
    converge faster (on a spectrum with a dominant ``sigma_1``, where the rounding of each product limits the Krylov
    basis, much faster).

    With ``n_iter`` given, exactly that many iterations run (more if ``d`` is still at most r); otherwise the
    iteration stops at the first that meets both goals, judged from the Ritz values (``eigvalsh``; the vectors only
    once the angle is in question, and at the end):

    * error: ``||W - U_r S_r V_r^T||_F`` within ``ERROR_TOLERANCE`` of the optimal (``_error_ratio_bound``);
    * subspace: the gap ``sigma_r / sigma_(r+1)`` is below ``GAP_DEFINED`` (``_gap_upper_bound``, from above: a
      weight whose gap is 1.01 or more is never taken for undefined unless its Ritz values stall; asked only once the
      error is within ``GAP_TRUST_ERROR``), or the top-r left
      subspace has converged: the move between two iterations, and the move extrapolated from the observed rate,
      below ``ANGLE_TOLERANCE_DEG`` (superlinear convergence: the linear extrapolation errs on the safe side).

    Returns None (the caller then takes the dense SVD) when ``max_iter`` iterations or a Krylov space of ``n``
    dimensions did not get there, or when the result is numerically suspect: a rank-deficient ``W`` (a Ritz value
    ``S_r`` below ``1e-6 S_1``) or a basis that lost orthogonality.
    """
    m, n = W.shape
    blocks = min(max_iter + 1, n // b)  # the Krylov space never exceeds n dimensions
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(m, b, generator=gen, dtype=torch.float32).to(W.device)
    KT = W.new_empty(blocks * b, n)  # (d_max, n): the basis as rows, so that KT[:d] is contiguous
    KT[:b] = torch.linalg.qr((omega.T @ W).T)[0].T  # the sketch W^T Omega, orthonormalised
    ZT = torch.empty(blocks * b, m, dtype=torch.float64, device=W.device)  # (W K)^T in float64, a block at a time
    G = torch.empty(0, 0, dtype=torch.float64, device=W.device)  # Z^T Z, (d, d)
    frobenius2 = float(torch.linalg.vector_norm(W)) ** 2  # ||W||_F^2
    energies: list[float] = []  # top-r Ritz energy S_1^2 + ... + S_r^2, one per check
    lambdas_r: list[float] = []  # S_r^2, one per check
    moves: list[float] = []  # largest principal angle between consecutive top-r left Ritz subspaces (degrees)
    previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (E, S) of the previous check, once vectors are kept
    q = 0
    while True:
        d = (q + 1) * b
        # W K_new as (m, b), seen as its (b, m) transpose: MKL runs W @ K_new^T 10-25 % faster than K_new^T @ W^T on
        # the FLUX shapes (b = 40; 12288 x 3072 the most), and the next product, product @ W, is as fast either way.
        product = (W @ KT[d - b:d].T).T  # (b, m): W applied to the newest block, as rows
        ZT[d - b:d] = product
        cross = ZT[:d] @ ZT[d - b:d].T  # (d, b): the new block column of Z^T Z
        G = torch.cat([torch.cat([G, cross[:-b].T]), cross], dim=1)
        done, E = False, None
        if d > rank and (n_iter is None or q >= n_iter):
            if n_iter is None and previous is None:
                eigenvalues = torch.linalg.eigvalsh(G).flip(0)  # descending
            else:
                eigenvalues, E = torch.linalg.eigh(G)  # ascending
                eigenvalues, E = eigenvalues.flip(0), E.flip(1)[:, :rank]  # E: (d, r), the top-r Ritz vectors in K
            eigenvalues = eigenvalues.clamp_min(0.0)
            S = eigenvalues.sqrt()  # (d,) Ritz values, descending
            if not float(S[rank - 1]) > 1e-6 * float(S[0]):
                return None  # W is (numerically) of rank below r: its trailing Ritz vectors are noise over ~0
            gap = _gap(S, rank, tuple(W.shape))
            if n_iter is not None:
                done = True
            else:
                energies.append(float(eigenvalues[:rank].sum()))
                lambdas_r.append(float(eigenvalues[rank - 1]))
                error_ratio = _error_ratio_bound(frobenius2, energies)
                error_ok = error_ratio <= ERROR_TOLERANCE
                # The gap estimate decides "undefined" only once the error is within GAP_TRUST_ERROR (see there).
                undefined = (error_ratio <= GAP_TRUST_ERROR and
                             _gap_upper_bound(lambdas_r, float(eigenvalues[rank]), float(eigenvalues[0])) < GAP_DEFINED)
                if error_ok and not undefined and E is None:  # the angle is in question: keep vectors from now on
                    E = torch.linalg.eigh(G)[1].flip(1)[:, :rank]
                converged = False
                if E is not None:
                    if previous is not None:
                        moves.append(_left_ritz_move_deg(E, S, *previous, G))
                        converged = _angle_converged(moves, _rate(energies, 1e-6 * frobenius2))
                    previous = (E, S)
                done = error_ok and (undefined or converged)
        if done:
            if E is None:
                E = torch.linalg.eigh(G)[1].flip(1)[:, :rank]
            return _ritz_triplets(KT[:d], ZT[:d], E, S, rank, gap, q)
        if q >= max_iter or q + 1 >= blocks:
            return None
        # (W^T W K_new)^T K = P^T Z = cross^T: the first Gram-Schmidt pass needs no product with the basis.
        KT[d:d + b] = _orthonormal_complement(product @ W, KT[:d], cross.T.to(W.dtype))
        q += 1


def _angle_converged(moves: list[float], energy_rate: float) -> bool:
    """Whether the top-r left Ritz subspace is within ``ANGLE_TOLERANCE_DEG`` of where the iteration converges.

    What is left is the last move between two iterations extrapolated geometrically, ``move rho / (1 - rho)``, at
    the larger of two estimates of the rate: the ratio of the last two moves (when there are two), and the square root
    of the rate of the top-r Ritz energy (an energy deficit shrinks as the sine squared of the angles that cause it).
    The last move itself must be under ``MOVE_MAX_DEG``: a guard on a rate read from one move and the energy's. (It was
    the 1-degree promise; but the move between iterations q-1 and q is how far q-1 was, not q: on the rehearsal's
    3072 x 3072 weight a move of 1.1 degrees left the 4th iterate 0.02 degrees off, and the 201-weight sweep,
    ``bench.decompose_sweep``, meets both goals at 3, worst angle 0.28 degree where the gap is defined.)
    """
    rates = [math.sqrt(energy_rate)]
    if len(moves) >= 2:
        rates.append(moves[-1] / moves[-2] if moves[-2] else 1.0)
    rho = max(rates)
    if rho >= 1.0:
        return False
    return moves[-1] < MOVE_MAX_DEG and moves[-1] * rho / (1.0 - rho) < ANGLE_TOLERANCE_DEG


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


def _ritz_triplets(KT: torch.Tensor, ZT: torch.Tensor, E: torch.Tensor, S: torch.Tensor, rank: int, gap: float,
                   iterations: int) -> TruncatedSVD | None:
    """The top-r Ritz triplets of ``_block_krylov`` as a ``TruncatedSVD`` (None when numerically suspect).

    Right vectors ``K E`` (in x r); left ``Z E / S`` (out x r), with ``Z = W K`` (out x d, stored as rows ``ZT``)
    in float64.
    """
    rightT = E.T.to(KT.dtype) @ KT  # (r, in): the right vectors as rows, V^T
    left = (E.T @ ZT).T / S[:rank]  # (out, r), float64
    # The left vectors are orthonormal by construction (E diagonalises Z^T Z); the right ones only as far as K is.
    eye = torch.eye(rank, dtype=torch.float64, device=KT.device)
    if float((rightT.double() @ rightT.double().T - eye).abs().max()) > 1e-4:
        return None  # the Krylov basis lost orthogonality, and with it the Rayleigh-Ritz step: do not trust it
    return TruncatedSVD(U=left.to(KT.dtype), S=S[:rank].to(KT.dtype), Vh=rightT, gap=gap, iterations=iterations)


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


def default_block(rank: int) -> int:
    """The Krylov block (columns per product) for ``rank``: five eighths of it, at least 16.

    Thinner blocks converge further for the same products (``_block_krylov``), but a product with fewer columns runs
    at a lower share of the machine's peak; on the FLUX.1-dev shapes at rank 64 (power-law and rehearsal spectra) the
    time to the goals was lowest near 40 columns.
    """
    return max(16, rank * 5 // 8)


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    n_iter: int | None = None,
    block: int | None = None,
    exact: bool | None = None,
    seed: int = 0,
    max_iter: int = 30,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``weight`` (out x in) in float32: within ``ERROR_TOLERANCE`` of the optimal rank-r
    error, and faithful to the exact top-r subspace wherever the weight defines one.

    The default path is within ``ANGLE_TOLERANCE_DEG`` (far inside 1 degree) of the dense SVD's top-r left
    subspace wherever ``sigma_r / sigma_(r+1) >= GAP_DEFINED``; below that gap no subspace is singled out by
    ``W`` and the result's ``gap`` says so (the caller records it).

    Args:
        weight: the Linear weight, any float dtype; decomposed in float32.
        rank: number of singular triplets, ``1 <= rank <= min(out, in)``.
        n_iter: a fixed number of block Krylov iterations for the randomized path (benchmarks); default:
            adaptive, until the error and subspace goals are met (see ``_block_krylov``).
        block: Krylov block columns; default ``default_block(rank)``.
        max_iter: the adaptive iteration gives up (dense SVD) after this many iterations.
        exact: force (True) or forbid (False) the dense LAPACK SVD; default: dense when ``min(out, in) <=
            DENSE_MAX_DIM`` or a sketch of ``r + max(r // 2, 16)`` columns would be at least a quarter of
            ``min(out, in)`` (the randomized path saves nothing there), and when the adaptive iteration has not
            converged after ``max_iter``.
        seed: seeds the Gaussian sketch, drawn on the CPU so every device sees the same sketch.
    """
    W = _as_float32(weight)
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be between 1 and min(out, in) = {min(m, n)} for a {m}x{n} weight")
    if exact is None:
        exact = min(m, n) <= DENSE_MAX_DIM or 4 * (rank + max(rank // 2, 16)) >= min(m, n)
    k = min(block or default_block(rank), min(m, n))
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
