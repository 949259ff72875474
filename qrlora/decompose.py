"""Pure float32 math behind every QR-LoRA method: no ``nn`` state, no file or backbone knowledge.

Notation (docs/ARCHITECTURE.md section 1): a Linear weight ``W`` is ``out x in``; rank ``r``; scale
``s = alpha / r``. The *core* is the top-r SVD part of ``W`` divided by ``s``:
``C = U_r diag(S_r / s) V_r^T``, and QR-LoRA (Yang et al., 2025, "QR-LoRA: Efficient and Disentangled
Fine-tuning via QR Decomposition for Customized Generation") factors it as ``C = Q R``.

The published code runs a full SVD of ``W``, forms the dense ``out x in`` core and QR-decomposes it.
Here the QR goes through the small ``r x in`` factor ``B = diag(S_r / s) V_r^T = Q_b R_b``, so
``Q = U_r Q_b`` and ``R = R_b``: one truncated SVD plus ``O((out + in) r^2)`` work, same ``Q`` and ``R``.
Large matrices use a seeded randomized subspace iteration (Halko, Martinsson & Tropp, 2011) for the SVD,
small ones an exact SVD; both are deterministic for a given device.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = [
    "TruncatedSVD",
    "truncated_svd",
    "qr_of_core",
    "spectral_slices",
    "fast_ica",
    "ica_of_core",
    "layer_seed",
    "optimal_rank_r_error",
]


@dataclass(frozen=True)
class TruncatedSVD:
    """Top-r singular triplets: ``U`` (out x r), ``S`` (r,), ``Vh`` (r x in), singular values descending."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


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


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    n_iter: int = 2,
    oversample: int | None = None,
    exact: bool | None = None,
    seed: int = 0,
) -> TruncatedSVD:
    """Top-``rank`` SVD of ``weight`` (out x in) in float32.

    Args:
        weight: the Linear weight, any float dtype; decomposed in float32.
        rank: number of singular triplets, ``1 <= rank <= min(out, in)``.
        n_iter: power iterations of the randomized path. With the rank-sized oversampling, 2 keeps the error
            within 1.001x of the optimum on the slowly decaying spectra of trained attention weights at about twice
            the speed of 4 (bench/decompose.py measures the trade-off: 4 gives 1.00003x, 1 gives 1.007x).
        oversample: extra sketch columns; default ``max(rank, 16)``.
        exact: force (True) or forbid (False) the dense LAPACK SVD; default: dense when the sketch would be
            at least a quarter of ``min(out, in)``, where the randomized path saves nothing.
        seed: seeds the Gaussian sketch, drawn on the CPU so every device sees the same sketch.
    """
    W = _as_float32(weight)
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} must be between 1 and min(out, in) = {min(m, n)} for a {m}x{n} weight")
    k = min(rank + (oversample if oversample is not None else max(rank, 16)), min(m, n))
    if exact is None:
        exact = 4 * k >= min(m, n)
    if exact:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        # Randomized subspace iteration on the smaller Gram side: sketch Y = W Omega (m x k),
        # re-orthonormalised after every multiply so small singular directions are not lost in rounding.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        omega = torch.randn(n, k, generator=gen, dtype=torch.float32).to(W.device)
        Y, _ = torch.linalg.qr(W @ omega)  # (m, k)
        for _ in range(n_iter):
            Z, _ = torch.linalg.qr(W.T @ Y)  # (n, k)
            Y, _ = torch.linalg.qr(W @ Z)  # (m, k)
        B = Y.T @ W  # (k, n): W ~= Y B
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        U = Y @ Ub[:, :rank]
        S, Vh = S[:rank], Vh[:rank]
    U, Vh = _fix_svd_signs(U.contiguous(), Vh.contiguous())
    return TruncatedSVD(U=U, S=S.contiguous(), Vh=Vh)


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
