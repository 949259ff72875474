"""Convergence: fixed-noise evaluation loss against optimizer steps, every method vs PEFT LoRA, same lr and rank.

    python -m bench.convergence [--backbones sd3,flux] [--steps 200] [--lr 1e-2] [--rank 4] [--seeds 0,1,2]

Each variant starts from the same base denoiser and learns one image (``assets/sty/swirl_painting``, 64 px) with
the trainer's own loss (``Backbone.training_loss``: the shared objective, per-step generators) and AdamW; PEFT
LoRA is diffusers' ``add_adapter(LoraConfig(r, lora_alpha=r))`` on the same targets. Every ``--eval_every`` steps
the probe scores the model (``qrlora.toy.fitprobe``: unweighted loss at six fixed noise levels with fixed noise),
reported as a fraction of the base model's score. The paper claims that training ``Q`` and ``R`` together
(``qr``) converges faster; the summary's ``steps_to_90`` (first evaluated step at or below 0.9 of the base) and
the final fraction answer it on these models, whichever way they fall.

Writes ``bench/reports/convergence.json`` and ``convergence.png`` (committed; the command is in the JSON).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from . import _common as C

REPORTS = Path(__file__).resolve().parent / "reports"
IMAGE_DIR = C.REPO_ROOT / "assets" / "sty" / "swirl_painting"
PROMPT = "a landscape in <s> style"
PEFT = "peft_lora"


def build_tiny(backbone: str, root: Path) -> Path:
    from qrlora.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(backbone, root / backbone)


def adapted_model(probe, variant: str, rank: int, seed: int):
    """A fresh base denoiser with the variant's adapter on the backbone's default targets; its parameters."""
    import torch

    from qrlora.core.inject import inject_adapters, trainable_parameters
    from qrlora.core.methods import AdapterConfig

    denoiser = probe.base_denoiser()
    targets = list(probe.backbone.default_targets)
    if variant == PEFT:
        from peft import LoraConfig

        torch.manual_seed(seed)  # PEFT draws A from the global RNG
        denoiser.requires_grad_(False)
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets))
        return denoiser, [p for p in denoiser.parameters() if p.requires_grad]
    inject_adapters(denoiser, AdapterConfig(method=variant, rank=rank, num_experts=2, seed=seed), targets)
    return denoiser, trainable_parameters(denoiser)


def curve(probe, variant: str, steps: int, lr: float, rank: int, seed: int, eval_every: int) -> list[tuple[int, float]]:
    """(step, evaluation loss / base) pairs, step 0 included."""
    import torch

    from qrlora.core.layers import apply_constraints_
    from qrlora.core.objective import step_generator

    base = probe.loss()
    denoiser, params = adapted_model(probe, variant, rank, seed)
    denoiser.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    points = [(0, probe.loss(denoiser.eval()) / base)]
    denoiser.train()
    for step in range(1, steps + 1):
        generator = step_generator(seed, step, 0, 0, "cpu")
        loss = probe.backbone.training_loss(denoiser, probe.latents, probe.cond, probe.schedule, probe.objective, generator).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        apply_constraints_(denoiser)
        if step % eval_every == 0:
            points.append((step, probe.loss(denoiser.eval()) / base))
            denoiser.train()
    return points


def steps_to(points: list[tuple[int, float]], level: float) -> int | None:
    return next((s for s, v in points if v <= level), None)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(results)
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.2), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        for variant, runs in results[backbone].items():
            steps = [s for s, _ in runs[0]]
            mean = [statistics.fmean(run[i][1] for run in runs) for i in range(len(steps))]
            style = "--" if variant == PEFT else "-"
            ax.plot(steps, mean, style, label=variant, linewidth=2.2 if variant in ("qr", PEFT) else 1.3)
        ax.set_title(f"tiny {backbone}: evaluation loss / base (mean of seeds)")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    import torch

    from qrlora.toy.fitprobe import FitProbe
    from qrlora.core.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="sd3,flux")
    p.add_argument("--methods", default=",".join([*METHODS, PEFT]))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--output", type=Path, default=REPORTS / "convergence.json")
    p.add_argument("--models", type=Path, default=Path("/tmp/qrlora_convergence_models"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results, summary = {}, []
    started = time.time()
    for backbone in args.backbones.split(","):
        model = build_tiny(backbone, args.models)
        probe = FitProbe(model, IMAGE_DIR, PROMPT, resolution=64, max_sequence_length=16 if backbone == "flux" else None)
        results[backbone] = {}
        for variant in args.methods.split(","):
            runs = [curve(probe, variant, args.steps, args.lr, args.rank, seed, args.eval_every) for seed in seeds]
            results[backbone][variant] = runs
            finals = [run[-1][1] for run in runs]
            reach = [steps_to(run, 0.9) for run in runs]
            row = {"backbone": backbone, "variant": variant, "final_mean": statistics.fmean(finals),
                   "final_spread": max(finals) - min(finals), "steps_to_90": reach}
            summary.append(row)
            print(f"{backbone:5s} {variant:12s} final {row['final_mean']:.3f} (spread {row['final_spread']:.3f}) "
                  f"steps to 0.90: {reach}", file=sys.stderr, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": C.machine_info(), "command": " ".join(["python", *sys.argv]),
              "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": time.time() - started,
              "summary": summary, "curves": results}
    C.write_json(args.output, report)
    plot(results, args.output.with_suffix(".png"))
    rows = [[r["backbone"], r["variant"], C.fmt(r["final_mean"]), C.fmt(r["final_spread"]),
             ", ".join("-" if s is None else str(s) for s in r["steps_to_90"])] for r in summary]
    print(C.markdown_table(["backbone", "variant", f"eval loss / base after {args.steps} steps (mean of {len(seeds)} seeds)",
                            "spread", "steps to 0.90 (per seed)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
