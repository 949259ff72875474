"""Study throughput: the seconds one (condition, seed) of the world study costs, the frozen-side conditions of issue
32 against the conditions the study already ran, measured side by side in one run.

One (condition, seed) is what the study does for it (``qrlora.cli.world_study.run_cell``): train the content and the
style adapter with the real trainer, merge them on the weight grid, score every cell with the world's classifier and
measure the mechanism, in a fresh study folder (nothing read back). The conditions run interleaved, round after round,
at the study's ``--quick`` settings (fewer steps, samples and cells than the full study, the same code path), and each
new condition is compared with the one of its family it replaces: the input-frozen QR conditions with ``triu_deltaR``,
Orthogonal Adaptation with ``lora``. Goal: every ratio at most 1.1.

    python -m bench.study_throughput --output bench/reports/study_throughput.json   # 3 rounds, ~10 min on 2 cores
    python -m bench.study_throughput --smoke                                       # 1 round, 2 conditions (tests)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import _common as C

BASELINE = {"qr_input_frozen": "triu_deltaR", "qr_input_frozen_disjoint": "triu_deltaR",
            "triu_qr_input_frozen": "triu_deltaR", "ortho_adapt": "lora", "ortho_adapt_shared": "lora",
            "ortho_adapt_gaussian": "lora"}
GOAL = 1.1


def time_condition(world: str, name: str, root: Path, quick) -> float:
    """Wall seconds of one (condition, seed 0) in a fresh study folder under ``root``."""
    from qrlora.cli.world_study import run_cell

    output = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    start = time.perf_counter()
    run_cell(world, name, 0, output, quick.samples, quick.grid, quick.steps)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from qrlora import quiet
    from qrlora.toy.world.study import QUICK
    from qrlora.toy.world.world import SHIPPED_WORLD

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=str(SHIPPED_WORLD), help="built world folder (default: the shipped one)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per condition, interleaved (default 3)")
    p.add_argument("--smoke", action="store_true", help="one round of qr_input_frozen and triu_deltaR (the tests)")
    p.add_argument("--idle-wait", type=float, default=10.0,
                   help="before each timed run wait up to this many seconds for no other runnable task (0 disables)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/study_throughput.json)")
    args = p.parse_args(argv)
    quiet.install()
    torch.set_num_threads(1)  # as the study's --jobs workers run
    names = ["triu_deltaR", "qr_input_frozen"] if args.smoke else ["triu_deltaR", "lora", *BASELINE]
    rounds = 1 if args.smoke else args.rounds
    gate = C.IdleGate(0.0 if args.smoke else args.idle_wait)
    info = C.machine_info()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order: drift hits both sides alike
                print(f"[study_throughput] round {r + 1}/{rounds} {name} ...", file=sys.stderr, flush=True)
                gate()
                seconds[name].append(round(time_condition(args.world, name, Path(tmp), QUICK), 2))
                AcceleratorState._reset_state()
    best = {n: min(v) for n, v in seconds.items()}
    ratios = {n: round(best[n] / best[b], 3) for n, b in BASELINE.items() if n in best and b in best}
    payload = {"benchmark": "study_throughput", "mode": "smoke" if args.smoke else "full",
               "settings": {"steps": QUICK.steps, "samples": QUICK.samples, "grid": list(QUICK.grid), "seed": 0,
                            "rounds": rounds, "torch_threads": 1},
               "timing": "best of the rounds per condition; one (condition, seed) = train the pair + merge, score and "
                         "measure it (run_cell) in a fresh study folder",
               "machine": info, "load_average_at_end": C.load_average(), "idle_gate": gate.report(),
               "git_revision": C.git_revision(), "seconds": seconds, "best_seconds": best,
               "over_baseline": ratios, "baseline": {n: BASELINE[n] for n in ratios}, "goal": GOAL,
               "worst": max(ratios.values()) if ratios else None}
    output = C.write_json(args.output or C.default_output("study_throughput"), payload)
    print(render(payload))
    print(f"\nJSON: {output}")
    return payload


def render(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"## Study throughput per (condition, seed) ({payload['mode']})",
             f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, {m['date']}; {payload['timing']}", ""]
    rows = [[n, payload["best_seconds"][n], payload["baseline"].get(n), payload["over_baseline"].get(n)]
            for n in payload["best_seconds"]]
    lines.append(C.markdown_table(["condition", "best s", "baseline", "ratio"], rows))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
