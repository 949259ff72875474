"""Bucketing benchmark: training images per second with ``--enable_bucket`` against square crops at the same pixel
count, the real trainer on the tiny SD3 pipeline (CPU), a folder of mixed-aspect images (96x64, 64x96, 80x80,
128x72, each twice).

Both variants run in this process, interleaved round by round (so a burst of load on the machine hits both).
A run's images per second is the batch over its median time between consecutive steps (data, forward, backward,
optimizer; model loading and saving excluded). Reported: each variant's images/s (median over rounds) and their
ratio (goal: no slower than 0.95x).

    python -m bench.bucketing            # 3 rounds of 40 steps per variant (~2 minutes on 2 cores)
    python -m bench.bucketing --smoke    # 1 round of 4 steps
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

from . import _common as C

TARGET_RATIO = 0.95
SIZES = [(96, 64), (64, 96), (80, 80), (128, 72)] * 2


def make_folder(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h), (30 * i, 90, 200 - 20 * i)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a <c> box number {i}")
    return folder


def run(model: Path, data: Path, out: Path, steps: int, bucket: bool, batch: int) -> list[float]:
    """Seconds between consecutive training steps of one quiet trainer run (each step collates one batch)."""
    from qrlora.cli.train import main
    from qrlora.training import trainer

    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--resolution", "64",
             "--max_train_steps", str(steps), "--train_batch_size", str(batch), "--output_dir", str(out),
             "--max_sequence_length", "48", "--checkpointing_steps", "100000"] + (["--enable_bucket"] if bucket else [])
    stamps, collate = [], trainer.collate

    def stamped(items):
        stamps.append(time.perf_counter())
        return collate(items)
    trainer.collate = stamped
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            main(flags)
    finally:
        trainer.collate = collate
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(C.REPO_ROOT / "bench" / "reports" / "bucketing.json"))
    args = parser.parse_args(argv)
    steps, rounds = (4, 1) if args.smoke else (40, args.rounds)
    batch = 2
    from qrlora.toy.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_pipeline("sd3", tmp / "tiny-sd3")
        data = make_folder(tmp / "data")
        rates = {"square": [], "buckets": []}
        for r in range(rounds):  # interleaved, so a burst of load on the machine hits both
            for name in ("square", "buckets"):
                intervals = run(model, data, tmp / f"{name}{r}", steps, name == "buckets", batch)
                rates[name].append(batch / C.median(intervals))  # the median step: robust to load bursts
    square, buckets = C.median(rates["square"]), C.median(rates["buckets"])
    payload = {"benchmark": "bucketing", "mode": "smoke" if args.smoke else "full", "machine": C.machine_info(),
               "setup": {"pipeline": "tiny sd3 (qrlora.toy.tiny)", "resolution": 64, "batch": batch,
                         "images": [f"{w}x{h}" for w, h in SIZES], "steps": steps, "rounds": rounds},
               "images_per_second": {"square_crops": square, "buckets": buckets, "per_round": rates},
               "ratio_buckets_to_square": buckets / square, "target_ratio": TARGET_RATIO,
               "meets_target": buckets / square >= TARGET_RATIO}
    path = C.write_json(args.output, payload)
    print(f"square crops {square:.1f} images/s, buckets {buckets:.1f} images/s: ratio {buckets / square:.3f} "
          f"(goal >= {TARGET_RATIO}); wrote {path}")


if __name__ == "__main__":
    main()
