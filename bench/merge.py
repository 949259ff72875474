"""Merge benchmark: folding a style and a content adapter into the FLUX.1-dev target shapes, two routes.

* ``residual`` route (the published one): read the residual file ``W_res = W - s Q R``, then recompose
  ``W_res + s Q (R + w1 dR1 + w2 dR2)`` (``qrlora.merging.merger.Merger(model, adapters, residual=...)``, which also checks
  that both adapters share Q and R).
* ``delta`` route (ours, the default): ``W + w1 dW1 + w2 dW2`` from the base weights already in memory and the two
  adapter files alone (``Merger(model, adapters)``); no residual file exists.

Both start from the model with its original weights and both adapters in memory (loaded adapter files), and
both end with the merged weights in the model; the two results are checked to agree. Each route is timed best
of N, interleaved. The residual read is timed warm (file in the page cache: the cheapest case for the residual
route) and cold (its pages dropped first with ``posix_fadvise(DONTNEED)``, as after a download or a reboot).
Per-shape times are extrapolated to the whole FLUX.1-dev target set (layer counts from the real config on the
meta device), with the residual bytes the delta route never writes, stores or reads.

    python -m bench.merge           # FLUX shapes, 5 repeats
    python -m bench.merge --quick   # FLUX shapes, 2 repeats (~1 minute on 2 cores)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from qrlora.files.checkpoint import AdapterFile, load_residual, residuals_from_adapter, save_residual
from qrlora.merging.merger import Merger
from qrlora.core.methods import AdapterConfig, get_method

from . import _common as C

FLUX_SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288)]
SMOKE_SHAPES = [(256, 256), (1024, 256), (256, 1024)]  # FLUX's / 12, for the test suite
LAYER = "block.proj"
WEIGHTS = [1.0, 1.0]  # style, content


class OneLayer(nn.Module):
    def __init__(self, out_f: int, in_f: int):
        super().__init__()
        self.block = nn.Module()
        self.block.proj = nn.Linear(in_f, out_f, bias=False)


def make_adapters(W: torch.Tensor, rank: int) -> tuple[AdapterFile, AdapterFile]:
    """A style and a content deltaR adapter of the same base layer: same Q, R; different trained dR."""
    cfg = AdapterConfig(method="deltaR", rank=rank)
    base = get_method("deltaR").initialize(W, cfg, LAYER)
    files = []
    for name, seed in (("style", 1), ("content", 2)):
        gen = torch.Generator().manual_seed(seed)
        dr = torch.randn(base["delta_r"].shape, generator=gen) * 0.01
        layers = {LAYER: {"q": base["q"], "base_r": base["base_r"], "delta_r": dr}}
        files.append(AdapterFile(config=cfg, component="transformer", layers=layers, path=f"<{name}>"))
    return files[0], files[1]


def _drop_page_cache(path: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def bench_shape(shape, args, tmp: Path, gate: C.IdleGate) -> dict:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(out_f + in_f)
    W = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    model = OneLayer(out_f, in_f)
    with torch.no_grad():
        model.block.proj.weight.copy_(W)
    style, content = make_adapters(W, args.rank)
    residual_path = tmp / f"residual_{out_f}x{in_f}.safetensors"
    save_residual(residual_path, residuals_from_adapter(style, {LAYER: W}))
    residual_bytes = residual_path.stat().st_size

    def reset():
        with torch.no_grad():
            model.block.proj.weight.copy_(W)

    def residual_route():
        Merger(model, [style, content], residual=load_residual(residual_path)).merge(WEIGHTS)

    def delta_route():
        Merger(model, [style, content]).merge(WEIGHTS)

    times = {"delta": [], "residual_warm": [], "residual_cold": []}
    merged = {}
    cold_ok = True
    for _ in range(args.repeats):
        for route, fn in (("delta", delta_route), ("residual_warm", residual_route), ("residual_cold", residual_route)):
            reset()
            if route == "residual_cold":
                cold_ok = _drop_page_cache(residual_path) and cold_ok
            else:
                load_residual(residual_path) if route == "residual_warm" else None  # page cache warm
            gate()
            seconds, _ = C.timed(fn)
            times[route].append(seconds)
            merged.setdefault(route, model.block.proj.weight.detach().clone())
    diff = float((merged["delta"] - merged["residual_warm"]).abs().max())
    scale = float(merged["delta"].abs().max())
    row = {"shape": list(shape), "residual_bytes": residual_bytes, "max_abs_difference": diff,
           "relative_difference": diff / scale, "cold_read_dropped_cache": cold_ok, "seconds": {}, "seconds_all": times}
    for route, ts in times.items():
        row["seconds"][route] = min(ts)
    row["residual_warm_over_delta"] = row["seconds"]["residual_warm"] / row["seconds"]["delta"]
    row["residual_cold_over_delta"] = row["seconds"]["residual_cold"] / row["seconds"]["delta"]
    residual_path.unlink()
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="FLUX shapes, 2 repeats (~1 minute)")
    size.add_argument("--smoke", action="store_true", help="FLUX shapes / 12, rank 16, for the test suite")
    p.add_argument("--rank", type=int, default=None, help="rank (default 64; 16 with --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per route (best of N; default 5, 2 quick)")
    p.add_argument("--tmpdir", type=Path, default=None, help="where the residual files are written (default: system temp)")
    p.add_argument("--idle-wait", type=float, default=None,
                   help="before each timed run wait up to this many seconds for no other runnable task "
                        "(default 30 full, 5 quick, 0 smoke; 0 disables)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/merge[_quick].json)")
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.rank = args.rank or (16 if mode == "smoke" else 64)
    args.repeats = args.repeats or (5 if mode == "full" else 2)
    if args.idle_wait is None:
        args.idle_wait = {"full": 30.0, "quick": 5.0, "smoke": 0.0}[mode]
    gate = C.IdleGate(args.idle_wait)
    output = args.output or C.default_output("merge" if mode == "full" else f"merge_{mode}")
    info = C.machine_info()
    shapes = SMOKE_SHAPES if mode == "smoke" else FLUX_SHAPES
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for shape in shapes:
            print(f"[merge] {C.shape_str(shape)} rank {args.rank} ...", file=sys.stderr, flush=True)
            rows.append(bench_shape(shape, args, Path(tmp), gate))

    counts = C.count_target_shapes("flux")
    if mode == "smoke":  # FLUX's counts on the / 12 shapes, so the extrapolation path is exercised
        counts = {(o // 12, i // 12): n for (o, i), n in counts.items()}
    by_shape = {tuple(r["shape"]): r for r in rows}
    total = {"layers": sum(counts.values()), "counts": {C.shape_str(s): n for s, n in counts.items()},
             "residual_bytes_avoided": sum(by_shape[s]["residual_bytes"] * n for s, n in counts.items()), "seconds": {}}
    for route in ("delta", "residual_warm", "residual_cold"):
        total["seconds"][route] = sum(by_shape[s]["seconds"][route] * n for s, n in counts.items())
    total["residual_warm_over_delta"] = total["seconds"]["residual_warm"] / total["seconds"]["delta"]
    total["residual_cold_over_delta"] = total["seconds"]["residual_cold"] / total["seconds"]["delta"]
    payload = {
        "benchmark": "merge",
        "mode": mode,
        "rank": args.rank,
        "method": "deltaR",
        "adapters": ["style", "content"],
        "weights": WEIGHTS,
        "timing": f"best of {args.repeats} per route, interleaved; each route from loaded adapters to merged weights",
        "machine": info,
        "load_average_at_end": C.load_average(),
        "idle_gate": gate.report(),
        "git_revision": C.git_revision(),
        "shapes": rows,
        "total_label": "FLUX.1-dev target set" if mode != "smoke" else "FLUX.1-dev layer counts on shapes / 12",
        "total": total,
    }
    C.write_json(output, payload)
    print(render(payload))
    print(f"\nJSON: {output}")
    return payload


def render(payload: dict) -> str:
    m, t = payload["machine"], payload["total"]
    lines = [
        f"## Merging a style + content adapter ({payload['method']}, rank {payload['rank']}, {payload['mode']})",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['date']}; {payload['timing']}; "
        f"{payload['idle_gate']['busy_starts']} of {payload['idle_gate']['timed_runs']} timed runs started with other tasks running",
        "",
    ]
    headers = ["shape (out x in)", "delta s", "residual s (warm)", "residual s (cold)", "residual/delta warm",
               "residual/delta cold", "residual MiB avoided", "max |diff|"]
    rows = [[C.shape_str(r["shape"]), r["seconds"]["delta"], r["seconds"]["residual_warm"], r["seconds"]["residual_cold"],
             r["residual_warm_over_delta"], r["residual_cold_over_delta"], r["residual_bytes"] / 2**20,
             r["max_abs_difference"]] for r in payload["shapes"]]
    s = t["seconds"]
    rows.append([f"{payload['total_label']} ({t['layers']} layers)", s["delta"], s["residual_warm"], s["residual_cold"],
                 t["residual_warm_over_delta"], t["residual_cold_over_delta"], t["residual_bytes_avoided"] / 2**20, None])
    lines.append(C.markdown_table(headers, rows))
    lines.append(f"\nThe delta route avoids a {t['residual_bytes_avoided'] / 2**30:.2f} GiB residual file for the whole "
                 "FLUX.1-dev target set (float32, as the residual format stores it)." if payload["mode"] != "smoke" else "")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
