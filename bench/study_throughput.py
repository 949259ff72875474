"""Study throughput: the seconds one (condition, seed) of the world study costs, the frozen-side conditions of issue
32 against the conditions the study already ran, measured side by side in one run.

One (condition, seed) is what the study does for it (``qrlora.cli.world_study.run_cell``): train the content and the
style adapter with the real trainer, merge them on the weight grid, score every cell with the world's classifier and
measure the mechanism, in a fresh study folder (nothing read back), at the study's own settings (each condition's
steps, 16 samples, the 4 x 4 weight grid). The conditions run interleaved, round after round; one condition per new
method is timed (the frozen-side conditions differ from these only in which basis columns they draw), each against the
existing condition of its family: the input-frozen QR methods against ``triu_deltaR``, Orthogonal Adaptation against
``lora``. Goal: every ratio at most 1.1.

    python -m bench.study_throughput --output bench/reports/study_throughput.json   # 3 rounds, ~15 min on 2 cores
    python -m bench.study_throughput --smoke                                       # quick settings, 2 conditions (tests)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import _common as C

BASELINE = {"qr_input_frozen": "triu_deltaR", "triu_qr_input_frozen": "triu_deltaR", "ortho_adapt": "lora",
            "ortho_adapt_gaussian": "lora"}  # one condition per new method and basis draw -> the family's existing one
GOAL = 1.1


def time_condition(world: str, name: str, root: Path, samples: int, grid: tuple[float, ...], steps: int | None) -> float:
    """Wall seconds of one (condition, seed 0) in a fresh study folder under ``root``."""
    from qrlora.cli.world_study import run_cell

    output = tempfile.mkdtemp(prefix=f"{name}-", dir=root)
    start = time.perf_counter()
    run_cell(world, name, 0, output, samples, grid, steps)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    import torch
    from accelerate.state import AcceleratorState

    from qrlora import quiet
    from qrlora.toy.world.study import QUICK, WEIGHT_GRID
    from qrlora.toy.world.world import SHIPPED_WORLD

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=str(SHIPPED_WORLD), help="built world folder (default: the shipped one)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per condition, interleaved (default 3)")
    p.add_argument("--samples", type=int, default=16, help="images per grid cell (default 16, the committed study's)")
    p.add_argument("--smoke", action="store_true",
                   help="one round of qr_input_frozen and triu_deltaR at the study's --quick settings (the tests)")
    p.add_argument("--idle-wait", type=float, default=10.0,
                   help="before each timed run wait up to this many seconds for no other runnable task (0 disables)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/study_throughput.json)")
    args = p.parse_args(argv)
    quiet.install()
    torch.set_num_threads(1)  # as the study's --jobs workers run
    names = ["triu_deltaR", "qr_input_frozen"] if args.smoke else ["triu_deltaR", "lora", *BASELINE]
    settings = (QUICK.samples, QUICK.grid, QUICK.steps) if args.smoke else (args.samples, WEIGHT_GRID, None)
    rounds = 1 if args.smoke else args.rounds
    gate = C.IdleGate(0.0 if args.smoke else args.idle_wait)
    info = C.machine_info()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternate the order: drift hits both sides alike
                print(f"[study_throughput] round {r + 1}/{rounds} {name} ...", file=sys.stderr, flush=True)
                gate()
                seconds[name].append(round(time_condition(args.world, name, Path(tmp), *settings), 2))
                AcceleratorState._reset_state()
    best = {n: min(v) for n, v in seconds.items()}
    ratios = {n: round(best[n] / best[b], 3) for n, b in BASELINE.items() if n in best and b in best}
    payload = {"benchmark": "study_throughput", "mode": "smoke" if args.smoke else "full",
               "settings": {"steps": settings[2] or "each condition's own", "samples": settings[0],
                            "grid": list(settings[1]), "seed": 0, "rounds": rounds, "torch_threads": 1},
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
