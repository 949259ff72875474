"""Training-step benchmark: every QR-LoRA method against PEFT LoRA injected through diffusers' ``add_adapter``.

An SD3-shaped ``SD3Transformer2DModel`` built from a config with the real width (24 heads x 64 = 1536, joint
attention dim 4096, caption projection 1536, pooled projection 2048) and a few blocks, random float32 weights,
256 px (latent 16 x 32 x 32, patch 2 -> 256 image tokens), batch 1, on the CPU. One training step is the trainer's own
loss (``Backbone.training_loss``: SD3's objective), backward, AdamW step (plus ``apply_constraints_`` for ours, which the trainer runs after
every step), ``zero_grad``. Every variant runs in its own process so that its peak memory is its own:

* ``peft_lora``: ``transformer.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
  target_modules=...))``, what diffusers' DreamBooth LoRA scripts do;
* every key of ``qrlora.core.methods.METHODS`` through ``qrlora.core.inject.inject_adapters`` at the same rank and targets.

Reported per variant, as ratios to ``peft_lora``: the median step time after warm-up, timed step by step
interleaved with a PEFT LoRA model in the same process (so that a burst of load on the machine hits both);
the FLOPs of one step (``FlopCounterMode``), which explain the time ratio independently of the machine; the
peak RSS of the variant's own process before its PEFT twin is built (``ru_maxrss``: imports, model build,
adapter init and training) and the peak RSS of the training steps alone (``VmHWM`` reset before the first
step; the memory target is judged on it, because the whole-process peak is set by the model build, the same
in every variant); trainable parameters (with the exact expected ``sum(in) / sum(in + out)`` for the methods
that train an ``r x in`` matrix).

    python -m bench.train_step            # 4 blocks, 154 text tokens, every method (~5 minutes on 2 idle cores)
    python -m bench.train_step --quick    # 1 block, 77 text tokens, fewer steps (~1-2 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import _common as C

TARGET_STEP_RATIO = 0.95  # deltaR / triu_deltaR / svd step time vs PEFT LoRA
TARGET_MEMORY_RATIO = 1.0

def r_by_in_methods(rank: int) -> list[str]:
    """Methods that train one r x in matrix (params = in / (in + out) of LoRA's), asked of the registry."""
    from qrlora.core.methods import METHODS, AdapterConfig

    return [name for name, m in METHODS.items() if m.trains_r_by_in(AdapterConfig(method=name, rank=rank, num_experts=1))]

SIZES = {
    # name: transformer blocks, heads, head dim, latent side (px / 8), text tokens, extra warm-up steps (after
    # the FLOP-counted first one), timed steps of the variant and as many of its PEFT twin
    "full": dict(layers=4, heads=24, head_dim=64, latent=32, text_len=154, warmup=1, steps=9),
    "quick": dict(layers=1, heads=24, head_dim=64, latent=32, text_len=77, warmup=0, steps=3),
    "smoke": dict(layers=1, heads=2, head_dim=32, latent=8, text_len=8, warmup=0, steps=2),
}


def all_variants() -> list[str]:
    from qrlora.core.methods import METHODS

    return ["peft_lora"] + list(METHODS)


# ---------------------------------------------------------------------------------------------------------
# Child: one variant in this process
# ---------------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset Linux's per-process RSS high-water mark (``VmHWM``), so the training peak excludes the build."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mib() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def sd3_default_targets() -> list[str]:
    """The SD3 wrappers' own target set (the backbone's default: 8 attention projections per joint block)."""
    from qrlora.backbones import BACKBONES

    return list(BACKBONES["sd3"].default_targets)


def build_model(size: dict):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    cfg = {**C.SD3_MEDIUM_CONFIG, "num_layers": size["layers"], "num_attention_heads": size["heads"],
           "attention_head_dim": size["head_dim"], "caption_projection_dim": size["heads"] * size["head_dim"]}
    return SD3Transformer2DModel(**cfg)


def present_targets(model, targets) -> list[str]:
    """The default targets that exist in this (truncated) model and feed its output: the last SD3 block has no
    context output, so its ``add_q_proj`` is discarded (``discarded_linears``), and a one-block model has no other."""
    from qrlora.backbones.base import discarded_linears
    from qrlora.core.inject import matches_target

    discarded = discarded_linears(model)
    names = [n for n, _ in model.named_modules() if n not in discarded]
    return [t for t in targets if any(matches_target(n, t) for n in names)]


def make_trainer(variant: str, size: dict, rank: int) -> dict:
    """A fresh model with ``variant`` attached, its optimizer, and a ``step()`` doing one full training step."""
    import torch
    from torch import nn

    from qrlora.core.inject import inject_adapters
    from qrlora.core.layers import apply_constraints_
    from qrlora.core.methods import AdapterConfig

    torch.manual_seed(0)
    model = build_model(size)
    model.train()
    targets = present_targets(model, sd3_default_targets())
    # The layers our injection adapts (the backbone's targets less the Linears whose output the model discards):
    # PEFT gets exactly these paths, so both sides train the same layers.
    from qrlora.backbones.base import discarded_linears

    discarded = discarded_linears(model)
    paths = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in discarded
             and any(n == t or n.endswith("." + t) for t in targets)]
    layer_shapes = [tuple(model.get_submodule(n).weight.shape) for n in paths]
    if variant == "peft_lora":
        from peft import LoraConfig

        model.requires_grad_(False)
        cfg = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=paths)
        init_seconds, _ = C.timed(lambda: model.add_adapter(cfg))
        constrain = None
    else:
        cfg = AdapterConfig(method=variant, rank=rank, num_experts=8)
        init_seconds, _ = C.timed(lambda: inject_adapters(model, cfg, targets))
        constrain = apply_constraints_  # the trainer re-imposes triu_deltaR's mask after every optimizer step
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    # Inputs: 256 px -> 16 x 32 x 32 latents (SD3's VAE), random text states and pooled embedding. The step is
    # the trainer's own: SD3's objective (logit-normal timesteps, preconditioned outputs) through
    # ``Backbone.training_loss`` with a frozen noise table and a per-step generator.
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qrlora.backbones import BACKBONES
    from qrlora.core.objective import NoiseSchedule

    sd3 = BACKBONES["sd3"]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's training table
    objective, schedule = sd3.objective(scheduler), NoiseSchedule.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, size["latent"], size["latent"], generator=gen)
    cond = {"prompt_embeds": torch.randn(1, size["text_len"], C.SD3_MEDIUM_CONFIG["joint_attention_dim"], generator=gen),
            "pooled_prompt_embeds": torch.randn(1, C.SD3_MEDIUM_CONFIG["pooled_projection_dim"], generator=gen)}

    def step():
        loss = sd3.training_loss(model, latents, cond, schedule, objective, torch.Generator().manual_seed(2)).mean()
        loss.backward()
        optimizer.step()
        if constrain is not None:
            constrain(model)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {"model": model, "step": step, "targets": targets, "layer_shapes": layer_shapes,
            "trainable": sum(p.numel() for p in params), "init_seconds": init_seconds}


def run_variant(variant: str, size: dict, rank: int, idle_wait: float = 0.0) -> dict:
    """Phase 1, alone in this process: FLOPs and peak memory of ``variant``. Phase 2: step time, interleaved
    step by step with a fresh PEFT LoRA model in the same process, so both see the same machine state."""
    import gc

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rss_start = C.current_rss_mib()
    t = make_trainer(variant, size, rank)
    rss_before = C.current_rss_mib()
    build_peak = C.peak_rss_mib()  # imports, model build, adapter init (resetting VmHWM resets ru_maxrss too)
    reset_ok = _reset_peak_rss()
    # One step under FlopCounterMode (also the first warm-up step): the machine-independent matmul and
    # attention FLOPs of forward + backward, which explain the measured time ratio.
    with FlopCounterMode(display=False) as counter:
        t["step"]()
    step_flops = counter.get_total_flops()
    for _ in range(size["warmup"]):
        t["step"]()
    train_peak = _vm_hwm_mib() if reset_ok else None
    peak = max(build_peak, C.peak_rss_mib())  # read before phase 2 builds a second model
    result = {
        "variant": variant,
        "rank": rank,
        "targets": t["targets"],
        "adapted_layers": len(t["layer_shapes"]),
        "sum_in": sum(s[1] for s in t["layer_shapes"]),
        "sum_out": sum(s[0] for s in t["layer_shapes"]),
        "trainable_params": t["trainable"],
        "init_seconds": t["init_seconds"],
        "step_gflops": step_flops / 1e9,
        "rss_at_start_mib": rss_start,
        "rss_before_train_mib": rss_before,
        "build_peak_rss_mib": build_peak,
        "train_peak_rss_mib": train_peak,
        "peak_rss_mib": peak,
        "torch_threads": torch.get_num_threads(),
    }
    # Phase 2: paired timing. PEFT's own process times PEFT against a second PEFT model (a check of the method).
    ref = make_trainer("peft_lora", size, rank)
    for _ in range(size["warmup"] + 1):
        ref["step"]()
    gate = C.IdleGate(idle_wait)
    times, ref_times = [], []
    for i in range(size["steps"]):
        order = ((t, times), (ref, ref_times)) if i % 2 == 0 else ((ref, ref_times), (t, times))
        for trainer, sink in order:
            gate()
            sink.append(C.timed(trainer["step"])[0])
    result.update({
        "step_seconds": times,
        "step_seconds_median": C.median(times),
        "paired_peft_step_seconds": ref_times,
        "paired_peft_step_seconds_median": C.median(ref_times),
        "step_time_ratio": C.median(times) / C.median(ref_times),
        "idle_gate": gate.report(),
    })
    del t, ref
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------------------
# Parent: every variant in its own process, then ratios
# ---------------------------------------------------------------------------------------------------------
def spawn(variant: str, mode: str, rank: int, size: dict, workdir: Path, idle_wait: float) -> dict:
    out = workdir / f"{variant}.json"
    cmd = [sys.executable, "-m", "bench.train_step", "--variant", variant, "--json-out", str(out),
           "--rank", str(rank), "--size-json", json.dumps(size), "--idle-wait", str(idle_wait)]
    print(f"[train_step] {variant} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=C.REPO_ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(out.read_text())


def summarise(results: list[dict]) -> dict:
    base = next(r for r in results if r["variant"] == "peft_lora" and "error" not in r)
    for r in results:
        if "error" in r:
            continue
        r["step_flops_ratio"] = r["step_gflops"] / base["step_gflops"]
        r["peak_memory_ratio"] = r["peak_rss_mib"] / base["peak_rss_mib"]
        if r["train_peak_rss_mib"] and base["train_peak_rss_mib"]:
            r["train_peak_memory_ratio"] = r["train_peak_rss_mib"] / base["train_peak_rss_mib"]
        r["trainable_param_ratio"] = r["trainable_params"] / base["trainable_params"]
        if r["variant"] in r_by_in_methods(r["rank"]):
            # exact integer check: ours * sum(in + out) == lora * sum(in)
            r["expected_param_ratio"] = r["sum_in"] / (r["sum_in"] + r["sum_out"])
            r["param_ratio_exact"] = r["trainable_params"] * (r["sum_in"] + r["sum_out"]) == base["trainable_params"] * r["sum_in"]
    verdict = {}
    for name in r_by_in_methods(base["rank"]):
        r = next((x for x in results if x["variant"] == name and "error" not in x), None)
        if r is None:
            continue
        verdict[name] = {
            "step_time_ok": r["step_time_ratio"] <= TARGET_STEP_RATIO,
            # the training-phase peak: the whole-process peak is set by the model build (diffusers computes SD3's
            # position-embedding table in float64), identical in every variant
            "peak_memory_ok": r.get("train_peak_memory_ratio", r["peak_memory_ratio"]) <= TARGET_MEMORY_RATIO,
            "params_ok": r["param_ratio_exact"],
        }
    return verdict


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    size_group = p.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="1 block, 77 text tokens, 3 paired steps (~1-2 min)")
    size_group.add_argument("--smoke", action="store_true", help="tiny width, peft_lora and deltaR only (test suite)")
    p.add_argument("--variants", default=None, help="comma-separated subset (default: peft_lora and every method)")
    p.add_argument("--rank", type=int, default=None, help="rank of every variant (default 64; 8 with --smoke)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (overrides the mode's)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (overrides the mode's)")
    p.add_argument("--idle-wait", type=float, default=None,
                   help="before each timed step wait up to this many seconds for no other runnable task "
                        "(default 30 full, 5 quick, 0 smoke; 0 disables)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/train_step[_quick].json)")
    # child-process interface
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--size-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    rank = args.rank or (8 if mode == "smoke" else 64)
    if args.idle_wait is None:
        args.idle_wait = {"full": 30.0, "quick": 5.0, "smoke": 0.0}[mode]
    if args.variant:  # child
        size = json.loads(args.size_json) if args.size_json else SIZES[mode]
        result = run_variant(args.variant, size, rank, args.idle_wait)
        C.write_json(args.json_out, result)
        return None

    size = dict(SIZES[mode])
    if args.layers:
        size["layers"] = args.layers
    if args.steps:
        size["steps"] = args.steps
    variants = args.variants.split(",") if args.variants else (["peft_lora", "deltaR"] if mode == "smoke" else all_variants())
    if "peft_lora" not in variants:
        variants = ["peft_lora"] + variants
    output = args.output or C.default_output("train_step" if mode == "full" else f"train_step_{mode}")
    info = C.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        results = [spawn(v, mode, rank, size, Path(tmp), args.idle_wait) for v in variants]
    failed = [r for r in results if "error" in r]
    verdict = summarise(results) if not any(r["variant"] == "peft_lora" for r in failed) else {}
    payload = {
        "benchmark": "train_step",
        "mode": mode,
        "rank": rank,
        "alpha": rank,
        "dtype": "float32",
        "device": "cpu",
        "resolution_px": size["latent"] * 8,
        "model": {"class": "SD3Transformer2DModel", "num_layers": size["layers"], "width": size["heads"] * size["head_dim"],
                  "image_tokens": (size["latent"] // 2) ** 2, "text_tokens": size["text_len"], "batch": 1},
        "size": size,
        "timing": f"median of {size['steps']} steps after {size['warmup'] + 1} warm-up steps, interleaved step by step "
                  "with a PEFT LoRA twin in the same process; memory from each variant's own process",
        "machine": info,
        "load_average_at_end": C.load_average(),
        "busy_starts": sum(r.get("idle_gate", {}).get("busy_starts", 0) for r in results),
        "git_revision": C.git_revision(),
        "targets": {"step_time_ratio_max": TARGET_STEP_RATIO, "peak_memory_ratio_max": TARGET_MEMORY_RATIO,
                    "param_ratio": "sum(in) / sum(in + out) for " + ", ".join(r_by_in_methods(rank))},
        "variants": results,
        "verdict": verdict,
    }
    C.write_json(output, payload)
    print(render(payload))
    print(f"\nJSON: {output}")
    if failed:
        for r in failed:
            print(f"\n{r['variant']} FAILED: {r['error']}", file=sys.stderr)
    return payload


def render(payload: dict) -> str:
    m, mod = payload["machine"], payload["model"]
    lines = [
        f"## Training step, {mod['class']} width {mod['width']}, {mod['num_layers']} block(s), "
        f"{payload['resolution_px']} px ({mod['image_tokens']} image + {mod['text_tokens']} text tokens), batch 1, "
        f"{payload['dtype']} on the {payload['device']}, rank {payload['rank']} ({payload['mode']})",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"peft {m['peft']}, {m['date']}; {payload['timing']}; {payload['busy_starts']} timed steps started with other "
        "tasks running",
        "",
    ]
    headers = ["variant", "step s (median)", "PEFT twin s", "step vs PEFT", "step GFLOP vs PEFT", "peak RSS MiB", "peak vs PEFT", "train peak MiB",
               "train peak vs PEFT",
               "trainable params", "params vs PEFT", "expected in/(in+out)", "init s"]
    rows = []
    for r in payload["variants"]:
        if "error" in r:
            rows.append([r["variant"], "FAILED"] + ["-"] * (len(headers) - 2))
            continue
        exp = r.get("expected_param_ratio")
        rows.append([r["variant"], r["step_seconds_median"], r["paired_peft_step_seconds_median"], r["step_time_ratio"],
                     r.get("step_flops_ratio"),
                     round(r["peak_rss_mib"]),
                     r.get("peak_memory_ratio"), None if r["train_peak_rss_mib"] is None else round(r["train_peak_rss_mib"]),
                     r.get("train_peak_memory_ratio"), r["trainable_params"],
                     r.get("trainable_param_ratio"),
                     None if exp is None else f"{exp:.4f} ({'exact' if r['param_ratio_exact'] else 'MISMATCH'})",
                     r["init_seconds"]])
    lines.append(C.markdown_table(headers, rows))
    if payload["verdict"]:
        lines += ["", f"Targets (step <= {TARGET_STEP_RATIO}x, training peak memory <= {TARGET_MEMORY_RATIO}x, "
                  "params = in/(in+out)):"]
        for name, v in payload["verdict"].items():
            lines.append(f"- {name}: step {C.fmt(v['step_time_ok'])}, memory {C.fmt(v['peak_memory_ok'])}, "
                         f"params {C.fmt(v['params_ok'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
