"""Measure the distributions tests/test_world.py's floors come from (and sweep adapter steps / learning rates).

For every method x steps x learning rate x seed: train the content and the style adapter on the shipped world
(``qrlora.cli.world.train_adapter``, the real trainer), then with ``--samples`` seeds measure, through the
real ``MergedPipeline`` (direct strategy):

* ``content``: held-out shape rate, content adapter alone, its own prompt (``a heart in flat style``);
* ``style``: held-out style rate, style adapter alone, its own prompt (``a circle in checker style``);
* ``merge_shape`` / ``merge_style``: the (1, 1) merge on ``a heart in checker style``;
* ``base_*``: the base model on the same prompts and seeds.

    python -m bench.world_thresholds --methods triu_deltaR --steps 40 --lrs 1e-2 --seeds 0,1,2,3,4

Prints one JSON line per run and a min / mean / max summary per setting.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from qrlora.files.checkpoint import load_adapter
from qrlora.merging.inference import MergedPipeline
from qrlora.cli.world_runs import render_settings, train_adapter
from qrlora.toy.world import data
from qrlora.toy.world.experiment import Sampler
from qrlora.toy.world.world import CONTENT_STYLE, SHIPPED_WORLD, STYLE_SHAPE, load_world


def measure(world, method: str, steps: int, lr: float, seed: int, samples: int, root: Path) -> dict:
    paths = {role: train_adapter(world, method, role, root / f"{method}-{steps}-{lr}-{seed}" / role, steps=steps,
                                 lr=lr, seed=seed) for role in ("content", "style")}
    merged = MergedPipeline(str(world.path), [load_adapter(paths["content"]), load_adapter(paths["style"])], None,
                            render_settings(world), strategy="direct", roles=(0, 1))
    s = Sampler(world, merged, samples)
    own_c, own_s = data.caption(world.new_shape, CONTENT_STYLE), data.caption(STYLE_SHAPE, world.new_style)
    both = data.caption(world.new_shape, world.new_style)
    out = {"method": method, "steps": steps, "lr": lr, "seed": seed, "samples": samples}
    out["content"] = world.rates(s.images((1, 0), [own_c]), shape=world.new_shape)["shape"]
    out["style"] = world.rates(s.images((0, 1), [own_s]), style=world.new_style)["style"]
    m = world.rates(s.images((1, 1), [both]), world.new_shape, world.new_style)
    out.update(merge_shape=m["shape"], merge_style=m["style"], merge_both=m["both"])
    out["base_content"] = world.rates(s.images((0, 0), [own_c]), shape=world.new_shape)["shape"]
    out["base_style"] = world.rates(s.images((0, 0), [own_s]), style=world.new_style)["style"]
    b = world.rates(s.images((0, 0), [both]), world.new_shape, world.new_style)
    out.update(base_merge_shape=b["shape"], base_merge_style=b["style"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=str(SHIPPED_WORLD))
    p.add_argument("--methods", default="triu_deltaR")
    p.add_argument("--steps", default="40")
    p.add_argument("--lrs", default="1e-2")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = load_world(args.world)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for steps in map(int, args.steps.split(",")):
                for lr in map(float, args.lrs.split(",")):
                    for seed in map(int, args.seeds.split(",")):
                        rows.append(measure(world, method, steps, lr, seed, args.samples, Path(tmp)))
                        print(json.dumps(rows[-1]), flush=True)
    keys = ("content", "style", "merge_shape", "merge_style", "merge_both", "base_content", "base_style",
            "base_merge_shape", "base_merge_style")
    settings = sorted({(r["method"], r["steps"], r["lr"]) for r in rows})
    for setting in settings:
        sel = [r for r in rows if (r["method"], r["steps"], r["lr"]) == setting]
        summary = {k: (min(r[k] for r in sel), float(np.mean([r[k] for r in sel])), max(r[k] for r in sel)) for k in keys}
        print("SUMMARY", setting, f"{len(sel)} seeds", json.dumps({k: [round(x, 3) for x in v] for k, v in summary.items()}))


if __name__ == "__main__":
    main()
