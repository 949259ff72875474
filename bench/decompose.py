"""Initialisation benchmark: ours against the published QR-LoRA algorithm and PEFT's fast SVD, side by side.

For every targeted Linear shape of FLUX.1-dev (3072x3072, 12288x3072, 3072x12288) and SD3-medium (1536x1536,
6144x1536, 1536x6144), at rank 64, on a seeded matrix whose singular values decay like a trained weight's:

* ``published``: the published QR-LoRA init (Yang et al., 2025): full ``torch.linalg.svd``, the dense out x in
  core ``U_r diag(S_r/s) V_r^T``, a dense reduced QR of that core, then ``Q[:, :r]``, ``R[:r]``.
  (The published code also forms the residual ``W - s Q R``; that is left out here, which only makes the
  ratio against ours smaller.)
* ``peft_pissa_niter_4``: PEFT's ``init_lora_weights="pissa_niter_4"`` SVD exactly as ``LoraLayer.pissa_init``
  calls it (``torch.svd_lowrank(W, q=r, niter=4)``, global RNG, no oversampling), followed by our small-factor
  QR (``qrlora.core.decompose.qr_of_core``) so that it yields the same Q and R objects.
* ``ours``: ``qrlora.core.decompose.truncated_svd(W, r)`` + ``qr_of_core(svd, s)``.

Reported per shape: time ratio against ``published`` (best of N repeats each, methods interleaved), the error
``||W - s Q R||_F`` over the optimal rank-r error (Eckart-Young, exact from the constructed spectrum),
``||Q^T Q - I||_F`` (float64; the Frobenius norm, which bounds the 2-norm also reported), and the largest entry below the diagonal of R. Then the total for the whole
FLUX.1-dev (and SD3-medium) target set: each distinct shape timed once, multiplied by the number of targeted
layers of that shape counted on the real model config built on the meta device.

Spectrum (``--spectrum``): ``power`` (default) ``sigma_i = i^-0.5``, the slow power-law decay of trained
attention and MLP weights, and the harder case for randomized SVD because the gap at the rank-r cut is tiny
(1.0078 at rank 64: below 1.01, so the top-r subspace is not defined and only the error goal applies);
``exp``: ``sigma_i = exp(-i / r) + 0.02``, a fast decay onto a noise floor; ``rehearsal``: the real-size
rehearsal's random weights (``bench.rehearsal.structured_weight``: ``0.1 G / sqrt(in) + A diag(4 * 0.97^i) B`` over
128 directions, stored in bf16 as the rehearsal stores them), whose gaps at rank 64 are about 1.01-1.05, so the
angle promise applies; its exact spectrum and subspace come from a dense float64 SVD.

    python -m bench.decompose            # full: FLUX + SD3 shapes (several minutes on 2 cores)
    python -m bench.decompose --quick    # SD3 shapes only (~1 minute on 2 cores)
    python -m bench.decompose --spectrum rehearsal --output bench/reports/decompose_rehearsal.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qrlora.core.decompose import GAP_DEFINED, TruncatedSVD, principal_angle_deg, qr_of_core, truncated_svd

from . import _common as C

FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)]
SD3_SHAPES = [(1536, 1536), (6144, 1536), (1536, 6144)]
SMOKE_SHAPES = [(256, 256), (1024, 256), (256, 1024)]  # SD3's shapes / 6, for the test suite

# Issue 28: ahead of PEFT's fast SVD on the whole FLUX.1-dev set (55x the published algorithm, where PEFT measured
# 53x), within 1.001 of the optimal error, within 1 degree of the exact subspace wherever the gap defines it.
TARGETS = {"ours_speedup_min": 55.0, "ours_ahead_of_peft": True, "error_ratio_max": 1.001, "orthogonality_max": 1e-5,
           "angle_max_deg": 1.0, "angle_gap_min": GAP_DEFINED}
WORLD = Path(__file__).resolve().parent.parent / "assets" / "world"
WORLD_RANKS = (4, 8, 16)


# ---------------------------------------------------------------------------------------------------------
# The three initialisations; each returns (Q out x r, R r x in) with s Q R ~= the top-r part of W
# ---------------------------------------------------------------------------------------------------------
def published_init(W: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The published QR-LoRA algorithm: full SVD, dense out x in core, dense QR of the core."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    core = U[:, :rank] @ torch.diag(S[:rank] / scale) @ Vh[:rank]  # (out, in), rank r, dense
    Q, R = torch.linalg.qr(core, mode="reduced")
    return Q[:, :rank], R[:rank]


def peft_pissa_niter_4_init(W: torch.Tensor, rank: int, scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``pissa_niter_4`` SVD (``svd_lowrank(W, q=r, niter=4)``), then our r x in QR of ``diag(S/s) V^T``."""
    torch.manual_seed(seed)  # svd_lowrank draws from the global RNG; PEFT does not seed it
    U, S, V = torch.svd_lowrank(W, q=rank, niter=4)
    return qr_of_core(TruncatedSVD(U=U, S=S, Vh=V.T), scale)


def ours_init(W: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qrlora: seeded randomized truncated SVD + QR of the small r x in factor."""
    return qr_of_core(truncated_svd(W, rank), scale)


def ours_with_power_iterations(n_iter: int):
    """Ours with a fixed ``n_iter`` block Krylov iterations instead of the adaptive default: the speed / error /
    angle trade-off (``2 n_iter + 2`` products with ``W`` of ``default_block(r)`` columns)."""
    def init(W: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return qr_of_core(truncated_svd(W, rank, n_iter=n_iter), scale)
    return init


def former_default_svd(W: torch.Tensor, rank: int, seed: int = 0) -> TruncatedSVD:
    """The randomized SVD that was the default before the faithful one: 2 power (subspace) iterations on a sketch of
    ``r + max(r, 16)`` columns, re-orthonormalised after every product (Halko, Martinsson & Tropp, 2011, Algorithm
    4.4), then the SVD of ``Y^T W``; kept here, and only here, as the comparison of the world rows."""
    k = min(rank + max(rank, 16), min(W.shape))
    gen = torch.Generator().manual_seed(seed)
    Y, _ = torch.linalg.qr(W @ torch.randn(W.shape[1], k, generator=gen))  # (out, k)
    for _ in range(2):
        Y, _ = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Y)[0])
    Ub, S, Vh = torch.linalg.svd(Y.T @ W, full_matrices=False)  # (k, k), (k,), (k, in)
    return TruncatedSVD(U=Y @ Ub[:, :rank], S=S[:rank], Vh=Vh[:rank])


SWEEP = [3, 4, 5, 6]  # fixed Krylov iterations; the default iterates adaptively (until its goals are met)
METHODS = {"published": published_init, "peft_pissa_niter_4": peft_pissa_niter_4_init, "ours": ours_init,
           **{f"ours_niter_{k}": ours_with_power_iterations(k) for k in SWEEP}}


# ---------------------------------------------------------------------------------------------------------
# Test matrices
# ---------------------------------------------------------------------------------------------------------
SPECTRA = {"power": "sigma_i = i^-0.5", "exp": "sigma_i = exp(-i/r) + 0.02",
           "rehearsal": "bench.rehearsal.structured_weight: 0.1 G/sqrt(in) + A diag(4 * 0.97^i) B over 128 "
                        "directions, stored in bf16"}


def spectrum(kind: str, k: int, rank: int) -> torch.Tensor:
    i = torch.arange(1, k + 1, dtype=torch.float64)
    if kind == "power":
        return i.pow(-0.5)
    if kind == "exp":
        return torch.exp(-i / rank) + 0.02
    raise ValueError(f"unknown spectrum {kind}")


def spectral_matrix(out_f: int, in_f: int, kind: str, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W = U diag(sigma) V^T`` (float32) with seeded Haar-random orthonormal U, V and a prescribed spectrum;
    returns ``W``, ``sigma`` and the exact top-``rank`` left singular vectors ``U[:, :rank]``. The ``rehearsal``
    spectrum is the rehearsal's own random weight instead, its ``sigma`` and ``U`` from a dense float64 SVD."""
    k = min(out_f, in_f)
    gen = torch.Generator().manual_seed(seed)
    if kind == "rehearsal":
        from .rehearsal import structured_weight

        W = structured_weight(out_f, in_f, gen).to(torch.bfloat16).float()  # as the rehearsal stores and loads it
        U, sigma, _ = torch.linalg.svd(W.double(), full_matrices=False)
        return W.contiguous(), sigma, U[:, :rank].float().contiguous()
    U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen))
    sigma = spectrum(kind, k, rank)
    W = (U * sigma.to(torch.float32)) @ V.T
    return W.contiguous(), sigma, U[:, :rank].contiguous()


def quality(W: torch.Tensor, Q: torch.Tensor, R: torch.Tensor, scale: float, optimal: float,
            exact_U: torch.Tensor) -> dict:
    """Error ratio, orthogonality, R's lower part and the largest principal angle (degrees) between span(Q) and
    the exact top-r left singular subspace (span(Q) = span(U_r) for an exact decomposition)."""
    err = float((W - scale * (Q @ R)).double().norm())
    Qd = Q.double()
    E = Qd.T @ Qd - torch.eye(Q.shape[1], dtype=torch.float64)
    below = float(R.tril(-1).abs().max()) if R.shape[0] > 1 else 0.0
    return {"error": err, "error_ratio": err / optimal, "angle_deg": principal_angle_deg(Q, exact_U),
            "orthogonality": float(E.norm()),
            "orthogonality_2norm": float(torch.linalg.matrix_norm(E, 2)), "r_below_diagonal": below}


# ---------------------------------------------------------------------------------------------------------
def bench_shape(shape, args, gate: C.IdleGate) -> dict:
    out_f, in_f = shape
    W, sigma, exact_U = spectral_matrix(out_f, in_f, args.spectrum, args.rank, seed=args.seed + out_f * 7 + in_f)
    optimal = float(sigma[args.rank:].pow(2).sum().sqrt())
    scale = 1.0  # alpha = rank, as published
    times = {m: [] for m in METHODS}
    results = {}
    rounds = max(args.repeats, args.published_repeats)
    for i in range(rounds):  # interleaved, so a burst of load on the machine hits every method alike
        for name, fn in METHODS.items():
            if i >= (args.published_repeats if name == "published" else args.repeats):
                continue
            gate()
            seconds, (Q, R) = C.timed(lambda: fn(W, args.rank, scale))
            times[name].append(seconds)
            if name not in results:
                results[name] = quality(W, Q, R, scale, optimal, exact_U)
            del Q, R
    row = {"shape": list(shape), "optimal_error": optimal, "gap": float(sigma[args.rank - 1] / sigma[args.rank]),
           "ours_iterations": truncated_svd(W, args.rank).iterations, "methods": {}}
    for name in METHODS:
        row["methods"][name] = {"seconds": min(times[name]), "seconds_all": times[name], **results[name]}
    pub = row["methods"]["published"]["seconds"]
    for name in METHODS:
        row["methods"][name]["speedup_vs_published"] = pub / row["methods"][name]["seconds"]
    return row


def world_rows(ranks=WORLD_RANKS) -> dict | None:
    """Ours on the shipped world's real weights (its backbone's default targets) against the dense SVD.

    Per rank: the largest principal angle between span(Q) and the exact top-r left singular subspace (mean and
    worst over layers, worst over the layers whose ``sigma_r / sigma_(r+1) >= GAP_DEFINED``), the error ratio,
    and the same for the previous default (``former_default_svd``: 2 power iterations) for comparison.
    """
    if not (WORLD / "model_index.json").is_file():
        return None
    from qrlora.backbones import detect_backbone
    from qrlora.core.inject import find_target_modules

    backbone = detect_backbone(str(WORLD))
    model = backbone.load_denoiser(str(WORLD))
    paths = find_target_modules(model, backbone.default_targets)
    out = {"path": "assets/world", "backbone": backbone.name, "layers": len(paths),
           "shapes": sorted({C.shape_str(tuple(model.get_submodule(p).weight.shape)) for p in paths}), "ranks": {}}
    for rank in ranks:
        per = {"ours": [], "previous_default": []}
        gaps, errors = [], []
        for path in paths:
            W = model.get_submodule(path).weight.detach().float()
            U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
            gap = float(S[rank - 1] / S[rank]) if rank < S.numel() and S[rank] > 0 else float("inf")
            optimal = float(S[rank:].pow(2).sum().sqrt())
            for name, svd in (("ours", truncated_svd(W, rank)),
                              ("previous_default", former_default_svd(W, rank))):
                Q, R = qr_of_core(svd, 1.0)
                per[name].append(principal_angle_deg(Q, U[:, :rank]))
                if name == "ours":
                    errors.append(float((W - Q @ R).double().norm()) / optimal if optimal > 0 else 1.0)
            gaps.append(gap)
        defined = [i for i, g in enumerate(gaps) if g >= GAP_DEFINED]
        out["ranks"][str(rank)] = {
            "layers_gap_below_threshold": len(paths) - len(defined), "smallest_gap": min(gaps),
            "worst_error_ratio": max(errors),
            **{name: {"mean_angle_deg": sum(a) / len(a), "worst_angle_deg": max(a),
                      "worst_angle_deg_where_defined": max((a[i] for i in defined), default=0.0)}
               for name, a in per.items()},
        }
    return out


def totals(rows: list[dict], counts: dict[tuple[int, int], int]) -> dict:
    by_shape = {tuple(r["shape"]): r for r in rows}
    out = {"layers": sum(counts.values()), "counts": {C.shape_str(s): n for s, n in counts.items()}, "seconds": {}}
    for name in METHODS:
        out["seconds"][name] = sum(by_shape[s]["methods"][name]["seconds"] * n for s, n in counts.items())
    out["speedup_vs_published"] = {n: out["seconds"]["published"] / out["seconds"][n] for n in METHODS}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="SD3-medium shapes only (~1 minute on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes (SD3's / 6) at rank 16, for the test suite")
    p.add_argument("--rank", type=int, default=None, help="rank (default 64; 16 with --smoke)")
    p.add_argument("--spectrum", choices=list(SPECTRA), default="power",
                   help="singular values of the test matrices (module docstring)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of ours and PEFT per shape (best of N; default 5, 3 quick)")
    p.add_argument("--published-repeats", type=int, default=None, help="timed runs of the published algorithm (default 2 full, 1 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--idle-wait", type=float, default=None,
                   help="before each timed run wait up to this many seconds for no other runnable task "
                        "(default 60 full, 10 quick, 0 smoke; 0 disables)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/decompose[_quick].json)")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.rank = args.rank or (16 if args.smoke else 64)
    args.repeats = args.repeats or (5 if mode == "full" else 3)
    args.published_repeats = args.published_repeats or (2 if mode == "full" else 1)
    if args.idle_wait is None:
        args.idle_wait = {"full": 60.0, "quick": 10.0, "smoke": 0.0}[mode]
    gate = C.IdleGate(args.idle_wait)
    output = args.output or C.default_output("decompose" if mode == "full" else f"decompose_{mode}")

    info = C.machine_info()
    shape_sets = {"full": FLUX_SHAPES + SD3_SHAPES, "quick": SD3_SHAPES, "smoke": SMOKE_SHAPES}[mode]
    # Warm up LAPACK / BLAS thread pools once so the first timed shape is not charged for it.
    _w, _, _ = spectral_matrix(128, 96, args.spectrum, 8, seed=1)
    for fn in METHODS.values():
        fn(_w, 8, 1.0)

    rows = []
    for shape in shape_sets:
        print(f"[decompose] {C.shape_str(shape)} rank {args.rank} ...", file=sys.stderr, flush=True)
        rows.append(bench_shape(shape, args, gate))

    flux_counts = C.count_target_shapes("flux")
    sd3_counts = C.count_target_shapes("sd3")
    measured = {tuple(r["shape"]) for r in rows}
    total = {}
    if set(flux_counts) <= measured:
        total["FLUX.1-dev"] = totals(rows, flux_counts)
    if set(sd3_counts) <= measured:
        total["SD3-medium"] = totals(rows, sd3_counts)
    if mode == "smoke":  # SD3's layer counts on the / 6 shapes, so the total path is exercised
        scaled = {(o // 6, i // 6): n for (o, i), n in sd3_counts.items()}
        total["SD3-medium layer counts on shapes / 6"] = totals(rows, scaled)

    world = world_rows() if mode != "smoke" else None
    worst_err = max(r["methods"]["ours"]["error_ratio"] for r in rows)
    # The angle promise holds where the matrix defines its top-r subspace (sigma_r / sigma_(r+1) >= 1.01).
    angles = [r["methods"]["ours"]["angle_deg"] for r in rows if r["gap"] >= GAP_DEFINED]
    if world:
        angles += [v["ours"]["worst_angle_deg_where_defined"] for v in world["ranks"].values()]
    worst_angle = max(angles, default=None)
    worst_orth = max(r["methods"]["ours"]["orthogonality"] for r in rows)
    flux = total.get("FLUX.1-dev")  # the speed target is set on the whole FLUX.1-dev target set
    verdict = {
        "speedup_total": flux["speedup_vs_published"]["ours"] if flux else None,
        "speedup_ok": flux["speedup_vs_published"]["ours"] >= TARGETS["ours_speedup_min"] if flux else None,
        "peft_speedup_total": flux["speedup_vs_published"]["peft_pissa_niter_4"] if flux else None,
        "ahead_of_peft": (flux["speedup_vs_published"]["ours"] > flux["speedup_vs_published"]["peft_pissa_niter_4"]
                          if flux else None),
        "worst_error_ratio": worst_err,
        "error_ok": worst_err <= TARGETS["error_ratio_max"],
        "worst_orthogonality": worst_orth,
        "orthogonality_ok": worst_orth <= TARGETS["orthogonality_max"],
        "worst_angle_deg_where_defined": worst_angle,
        "angle_ok": None if worst_angle is None else worst_angle <= TARGETS["angle_max_deg"],
    }
    payload = {
        "benchmark": "decompose",
        "mode": mode,
        "rank": args.rank,
        "alpha": args.rank,
        "spectrum": args.spectrum,
        "spectrum_definition": SPECTRA[args.spectrum],
        "timing": f"best of {args.repeats} (published: best of {args.published_repeats}), methods interleaved",
        "machine": info,
        "load_average_at_end": C.load_average(),
        "idle_gate": gate.report(),
        "git_revision": C.git_revision(),
        "targets": TARGETS,
        "shapes": rows,
        "totals": total,
        "world": world,
        "verdict": verdict,
    }
    C.write_json(output, payload)
    tradeoff_plot(payload, output.with_suffix(".png"))
    print(render(payload))
    print(f"\nJSON: {output}")
    return payload


def tradeoff_plot(payload: dict, path: Path) -> None:
    """Two panels over the whole-set speed-up against the published init, one point per variant of ours (and
    PEFT): the worst error ratio, and the worst principal angle to the exact top-r subspace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = next(iter(payload["totals"].values()), None)
    if total is None:
        return
    fig, (ax_err, ax_ang) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for name in METHODS:
        if name == "published":
            continue
        speed = total["speedup_vs_published"][name]
        error = max(r["methods"][name]["error_ratio"] for r in payload["shapes"])
        angle = max(r["methods"][name]["angle_deg"] for r in payload["shapes"])
        label = {"ours": "ours (adaptive, default)", "peft_pissa_niter_4": "PEFT svd_lowrank niter=4"}.get(
            name, name.replace("ours_niter_", "ours n_iter="))
        for ax, y in ((ax_err, error), (ax_ang, angle)):
            ax.scatter(speed, y, s=40)
            ax.annotate(label, (speed, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax_err.axhline(1.001, color="grey", linestyle=":", linewidth=1)
    ax_ang.axhline(TARGETS["angle_max_deg"], color="grey", linestyle=":", linewidth=1)
    ax_ang.set_yscale("log")
    gaps = ", ".join(f"{r['gap']:.4f}" for r in payload["shapes"][:1])
    for ax, ylabel in ((ax_err, "worst ||W - sQR||_F / optimal rank-r error"),
                       (ax_ang, f"worst angle to the exact top-r subspace (deg; gap {gaps})")):
        ax.set_xlabel(f"time: speed-up over the published init ({next(iter(payload['totals']))} set)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"init trade-off: error, angle and time, rank {payload['rank']}, {payload['spectrum']} spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        f"## Initialisation at rank {payload['rank']} ({payload['mode']}, spectrum {payload['spectrum_definition']})",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads), {m['date']}; "
        f"{payload['timing']}; {payload['idle_gate']['busy_starts']} of {payload['idle_gate']['timed_runs']} timed runs "
        f"started with other tasks running",
        "",
    ]
    headers = ["shape (out x in)", "published s", "PEFT pissa_niter_4 s", "ours s", "ours speedup", "PEFT speedup",
               "err/opt published", "err/opt PEFT", "err/opt ours", "gap s_r/s_r+1", "angle PEFT deg",
               "angle ours deg", "||QtQ-I|| ours"]
    rows = []
    for r in payload["shapes"]:
        ms = r["methods"]
        rows.append([C.shape_str(r["shape"]), ms["published"]["seconds"], ms["peft_pissa_niter_4"]["seconds"],
                     ms["ours"]["seconds"], ms["ours"]["speedup_vs_published"],
                     ms["peft_pissa_niter_4"]["speedup_vs_published"], f"{ms['published']['error_ratio']:.5f}",
                     f"{ms['peft_pissa_niter_4']['error_ratio']:.5f}", f"{ms['ours']['error_ratio']:.5f}",
                     f"{r['gap']:.4f}", f"{ms['peft_pissa_niter_4']['angle_deg']:.2f}",
                     f"{ms['ours']['angle_deg']:.3f}", ms["ours"]["orthogonality"]])
    lines.append(C.markdown_table(headers, rows))
    if payload["totals"]:
        lines += ["", "Whole target set (each shape timed once x number of targeted layers of that shape):", ""]
        trows = []
        for name, t in payload["totals"].items():
            s = t["seconds"]
            trows.append([name, t["layers"], s["published"], s["peft_pissa_niter_4"], s["ours"],
                          t["speedup_vs_published"]["ours"], t["speedup_vs_published"]["peft_pissa_niter_4"]])
        lines.append(C.markdown_table(["target set", "layers", "published s", "PEFT s", "ours s", "ours speedup",
                                       "PEFT speedup"], trows))
    if payload["totals"]:
        name, t = next(iter(payload["totals"].items()))
        lines += ["", f"Krylov iterations of ours: speed / error / angle trade-off ({name} set; plot beside the JSON):", ""]
        srows = [[n.replace("ours_niter_", "n_iter=") if n != "ours" else "adaptive (default)",
                  t["speedup_vs_published"][n], f"{max(r['methods'][n]['error_ratio'] for r in payload['shapes']):.5f}",
                  f"{max(r['methods'][n]['angle_deg'] for r in payload['shapes']):.3f}"]
                 for n in ["ours", *[f"ours_niter_{k}" for k in SWEEP]]]
        lines.append(C.markdown_table(["ours", "speedup vs published", "worst err/opt", "worst angle deg"], srows))
    world = payload.get("world")
    if world:
        lines += ["", f"The shipped world ({world['path']}, {world['layers']} targeted Linears, {', '.join(world['shapes'])}): "
                  "largest principal angle to the dense SVD's top-r subspace, degrees:", ""]
        wrows = [[rank, v["layers_gap_below_threshold"], f"{v['smallest_gap']:.4f}",
                  f"{v['ours']['mean_angle_deg']:.4f} / {v['ours']['worst_angle_deg']:.4f}",
                  f"{v['ours']['worst_angle_deg_where_defined']:.4f}",
                  f"{v['previous_default']['mean_angle_deg']:.2f} / {v['previous_default']['worst_angle_deg']:.2f}",
                  f"{v['previous_default']['worst_angle_deg_where_defined']:.2f}", f"{v['worst_error_ratio']:.6f}"]
                 for rank, v in world["ranks"].items()]
        lines.append(C.markdown_table(["rank", f"layers with gap < {GAP_DEFINED}", "smallest gap",
                                       "ours mean / worst", "ours worst (gap >= 1.01)",
                                       "2-iteration randomized mean / worst", "its worst (gap >= 1.01)",
                                       "ours worst err/opt"], wrows))
    v = payload["verdict"]
    speed = (f"{C.fmt(v['speedup_ok'])} ({v['speedup_total']:.1f}x; ahead of PEFT's {v['peft_speedup_total']:.1f}x in "
             f"this run: {C.fmt(v['ahead_of_peft'])})" if v["speedup_total"] is not None
             else "not measured in this mode (it needs the FLUX shapes: run without --quick)")
    lines += ["", f"Targets: speedup >= {TARGETS['ours_speedup_min']:g}x on the whole FLUX.1-dev target set: {speed}; "
              f"error <= {TARGETS['error_ratio_max']} x optimal: {C.fmt(v['error_ok'])} (worst {v['worst_error_ratio']:.5f}); "
              f"orthogonality <= 1e-5: {C.fmt(v['orthogonality_ok'])} (worst {v['worst_orthogonality']:.1e}); "
              + (f"angle <= {TARGETS['angle_max_deg']:g} deg where sigma_r / sigma_(r+1) >= {GAP_DEFINED}: "
                 f"{C.fmt(v['angle_ok'])} (worst {v['worst_angle_deg_where_defined']:.3f})"
                 if v["worst_angle_deg_where_defined"] is not None else "angle: no measured matrix has a defined gap")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
