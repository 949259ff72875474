"""FLUX.1-dev-sized GPU benchmark: init time of every targeted layer, then training step time and peak memory.

A ``FluxTransformer2DModel`` built from the published FLUX.1-dev config (19 double + 38 single blocks, width
3072, ~11.9 B parameters) with random bf16 weights (no download; built on the meta device, then materialised
on the GPU and filled with ``N(0, 1/in)`` weights, zero biases, unit norms). Three parts, each in its own
process so that every peak memory is its own:

1. ``init``: QR-LoRA initialisation of all 342 targeted layers at rank 64, ours (``inject_adapters``, measured
   on the whole model) against the published algorithm (full SVD, dense core, dense QR; one layer of each
   distinct shape timed, multiplied by the layer count) and PEFT's ``pissa_niter_4`` SVD (same extrapolation).
2. ``train``: one training step at 512 px (4096 latent pixels packed into 1024 image tokens, 512 T5 tokens),
   batch 1, gradient checkpointing, bf16 autocast with float32 trainable parameters (what diffusers' FLUX
   DreamBooth LoRA script does), AdamW; ``triu_deltaR`` against PEFT LoRA (``add_adapter``) at rank 64 and
   the same targets. Median step time after warm-up, ``torch.cuda.max_memory_allocated``.
3. the same two variants on a quantized base (``qrlora.core.quantize.quantize_base_``: NF4 with bitsandbytes, else
   fp8 with torchao; every frozen Linear), when either library is installed; skipped with a note otherwise.
   Ours decomposes the bf16 weights first, then quantizes; PEFT's base is quantized before ``add_adapter``.

4. ``memory``: every row of ``bench/reports/flux_memory.json`` (the CPU estimate of ``bench/flux_memory.py``) that
   fits this GPU, measured: one child per base / rank / method builds the model once with the estimate's own
   code (``flux_memory.build_model`` on CUDA, random bf16 weights, the adapters attached as in the estimate;
   fp8 / nf4 through ``qrlora.core.quantize.quantize_base_`` when the library is installed), then per resolution and
   checkpointing runs ``flux_memory.training_step`` twice (the first creates AdamW's state) and records
   ``torch.cuda.max_memory_allocated`` over the second as ``measured_peak_gib`` beside ``peak_gib``. Block swap
   rows stay estimates (the trainer's ``--blocks_to_swap`` is not in this benchmark). bf16 first, then the
   quantized bases, until ``--memory-budget`` seconds are used. The report (the estimate with ``measured``
   added) goes to ``--memory-output``; ``--memory-output bench/reports/flux_memory.json`` fills the table in docs/memory.md.

5. ``fsdp``: the trainer's sharded path (``accelerate launch --config_file configs/accelerate_fsdp.yaml``,
   ``qrlora.training.sharding``) on a tiny random FLUX pipeline: 4 steps with a checkpoint at step 2 (bf16 mixed precision,
   gradient checkpointing), then a resume from that checkpoint, which must end on the same adapter bit for bit.
   Two processes on two or more GPUs (NCCL), one on a single GPU (the same code over a one-process group: it
   checks the path on CUDA, it saves no memory), two CPU processes over gloo with ``--tiny-cpu``. Its result goes
   into the same JSON (``fsdp``); ``--no-fsdp`` skips it.

Runs in well under 8 minutes on an H100/H200. Without a CUDA GPU it prints a message and exits 0 (use
``bench/gpu_flux.sh``). ``--tiny-cpu`` runs the same code on a tiny FLUX config on the CPU (a logic check only,
used by the test suite; its numbers mean nothing).

    bash bench/gpu_flux.sh                  # or: python -m bench.gpu_flux [--output PATH]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import _common as C

NO_GPU_MESSAGE = "bench/gpu_flux.py: no CUDA GPU available (torch.cuda.is_available() is False); nothing to measure."
RANK = 64
TINY_CONFIG = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))
SIZES = {
    # latent side (512 px / 8 = 64 -> 32 x 32 packed tokens), text tokens, warm-up and timed steps
    "gpu": dict(latent=64, text_len=512, warmup=2, steps=5, rank=RANK),
    "tiny-cpu": dict(latent=8, text_len=8, warmup=1, steps=1, rank=4),
}
TRAIN_VARIANTS = ["peft_lora", "triu_deltaR"]  # + the same two on a quantized base, "+nf4" or "+fp8"


# ---------------------------------------------------------------------------------------------------------
# Model with random bf16 weights
# ---------------------------------------------------------------------------------------------------------
def build_flux(device: str, tiny: bool):
    import torch
    from diffusers import FluxTransformer2DModel

    cfg = TINY_CONFIG if tiny else C.FLUX_DEV_CONFIG
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for _, b in model.named_buffers():
            b.zero_()
    return model


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Part 1: init time
# ---------------------------------------------------------------------------------------------------------
def run_init(device: str, tiny: bool, size: dict) -> dict:
    import torch
    from collections import Counter

    from .decompose import peft_pissa_niter_4_init, published_init, ours_init
    from qrlora.core.inject import find_target_modules, inject_adapters
    from qrlora.core.methods import AdapterConfig

    sync = _sync(device)
    rank = size["rank"]
    model = build_flux(device, tiny)
    paths = find_target_modules(model, C.DEFAULT_TARGETS)
    shapes = Counter(tuple(model.get_submodule(p).weight.shape) for p in paths)
    first_of = {}
    for p in paths:
        first_of.setdefault(tuple(model.get_submodule(p).weight.shape), p)
    warm = torch.randn(256, 192, device=device)
    for fn in (published_init, peft_pissa_niter_4_init, ours_init):  # cuSOLVER / cuBLAS handles, kernels
        fn(warm, 8, 1.0)
    per_shape = {}
    for shape, path in first_of.items():
        W = model.get_submodule(path).weight.detach().float()  # decompose in float32, as both codes do
        row = {}
        for name, fn in (("published", published_init), ("peft_pissa_niter_4", peft_pissa_niter_4_init), ("ours", ours_init)):
            row[name] = C.timed(lambda fn=fn, W=W: fn(W, rank, 1.0), sync)[0]
        per_shape[C.shape_str(shape)] = row
        del W
    extrapolated = {name: sum(per_shape[C.shape_str(s)][name] * n for s, n in shapes.items())
                    for name in ("published", "peft_pissa_niter_4", "ours")}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, report = C.timed(lambda: inject_adapters(model, AdapterConfig(method="triu_deltaR", rank=rank), C.DEFAULT_TARGETS), sync)
    return {
        "part": "init",
        "layers": len(paths),
        "counts": {C.shape_str(s): n for s, n in shapes.items()},
        "per_shape_seconds": per_shape,
        "extrapolated_seconds": extrapolated,
        "ours_inject_all_layers_seconds": seconds,
        "speedup_ours_inject_vs_published": extrapolated["published"] / seconds,
        "speedup_ours_vs_published_per_shape_sum": extrapolated["published"] / extrapolated["ours"],
        "speedup_peft_vs_published": extrapolated["published"] / extrapolated["peft_pissa_niter_4"],
        "trainable_params": report.trainable_params,
    }


# ---------------------------------------------------------------------------------------------------------
# Parts 2-3: training step
# ---------------------------------------------------------------------------------------------------------
def _quantize(model, precision: str) -> int:
    """Store every frozen base Linear in ``precision`` with the library's own ``qrlora.core.quantize.quantize_base_``
    (PEFT's variant gets the very same call before its adapters are added). Returns the number of Linears."""
    from torch import nn

    from qrlora.core.quantize import quantize_base_

    count = sum(type(m) is nn.Linear for m in model.modules())
    quantize_base_(model, precision)
    return count


def run_memory(part: str, device: str, tiny: bool, estimate_path: Path) -> dict:
    """Child ``memory:<base>:<rank>:<method>``: the measured peak of each (resolution, checkpointing) row of the
    estimate for that base, rank and method that fits this device."""
    import torch

    from . import flux_memory as FM

    _, base, rank, method = part.split(":")
    rank = int(rank)
    estimate = json.loads(estimate_path.read_text())
    config = TINY_CONFIG if tiny else C.FLUX_DEV_CONFIG
    text_len = SIZES["tiny-cpu"]["text_len"] if tiny else FM.TEXT_LEN
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else float("inf")
    wanted = [r for r in estimate["rows"] if (r["base"], r["rank"], r["method"], r["blocks_to_swap"]) == (base, rank, method, 0)
              and r["peak_gib"] < 0.9 * total]
    if not wanted:
        return {"part": part, "rows": []}
    first = FM.Setting(base, wanted[0]["resolution"], rank, False, method)
    model = FM.build_model(config, FM.Setting("bf16", first.resolution, rank, False, method), C.DEFAULT_TARGETS, device=device)
    if base in FM.QUANT_BYTES_PER_WEIGHT:
        _quantize(model, base)
    import dataclasses

    schedule = FM.flux_schedule()
    schedule = dataclasses.replace(schedule, timesteps=schedule.timesteps.to(device), sigmas=schedule.sigmas.to(device))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    out = []
    for r in wanted:
        setting = FM.Setting(base, r["resolution"], rank, r["checkpointing"], method)
        if setting.checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        latents, cond = FM.make_inputs(config, setting.resolution, text_len, device=device)
        try:
            FM.training_step(model, optimizer, latents, cond, schedule)  # AdamW's state exists from here on
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            FM.training_step(model, optimizer, latents, cond, schedule)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            out.append({"key": _row_key(r), "measured_peak_gib": peak})
        except torch.cuda.OutOfMemoryError:
            out.append({"key": _row_key(r), "measured_peak_gib": None, "measured_error": "out of memory"})
        del latents, cond
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"part": part, "rows": out}


def _row_key(r: dict) -> list:
    return [r[k] for k in ("base", "resolution", "rank", "checkpointing", "blocks_to_swap", "method")]


def run_memory_parts(device: str, tiny: bool, estimate_path: Path, output: Path, budget_s: float, workdir: Path,
                     bases: list[str], info: dict) -> dict:
    """Every ``memory`` child (bf16 first) until ``budget_s`` is used; the estimate with ``measured`` beside it."""
    import time

    from . import flux_memory as FM

    estimate = json.loads(estimate_path.read_text())
    start, measured, skipped = time.perf_counter(), {}, []
    for base in bases:
        for rank in sorted({r["rank"] for r in estimate["rows"]}):
            for method in FM.METHODS:
                part = f"memory:{base}:{rank}:{method}"
                if time.perf_counter() - start > budget_s:
                    skipped.append(part)
                    continue
                result = spawn(part, device, tiny, workdir, timeout=max(budget_s, 60), estimate=estimate_path)
                for row in result.get("rows", []):
                    measured[tuple(row["key"])] = row
                if "error" in result:
                    skipped.append(f"{part}: {result['error'].splitlines()[-1][:200]}")
    for r in estimate["rows"]:
        m = measured.get(tuple(_row_key(r)))
        r["measured_peak_gib"] = None if m is None or m["measured_peak_gib"] is None else round(m["measured_peak_gib"], 3)
        if m and m.get("measured_error"):
            r["measured_error"] = m["measured_error"]
    estimate["measured_on"] = {"gpu": info.get("gpu"), "date": info.get("date"), "command": info.get("command"),
                               "seconds": round(time.perf_counter() - start, 1), "not_measured": skipped,
                               "block_swap": "modelled only (not measured)"}
    C.write_json(output, estimate)
    return estimate


def run_train(variant: str, device: str, tiny: bool, size: dict) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from qrlora.backbones import BACKBONES
    from qrlora.core.inject import inject_adapters
    from qrlora.core.layers import apply_constraints_, cast_base_model_
    from qrlora.core.methods import AdapterConfig
    from qrlora.core.objective import NoiseSchedule, Objective

    sync = _sync(device)
    method, _, quant = variant.partition("+")
    rank = size["rank"]
    # As the trainer does: build and inject on the CPU, then move the model (adapters included) to the device.
    model = build_flux("cpu", tiny)
    quantized = 0
    if method == "peft_lora":
        from peft import LoraConfig

        model.requires_grad_(False)
        init_s, _ = C.timed(lambda: model.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=C.DEFAULT_TARGETS)), _sync("cpu"))
        model.to(device)
        constrain = None
    else:
        init_s, _ = C.timed(lambda: inject_adapters(model, AdapterConfig(method=method, rank=rank), C.DEFAULT_TARGETS), _sync("cpu"))
        cast_base_model_(model, torch.bfloat16).to(device)
        constrain = apply_constraints_
    if quant:  # both sides quantize the base after the adapters exist (ours decomposes the weights as loaded)
        quantized = _quantize(model, quant)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trainable parameters in float32 (diffusers' cast_training_params)
        p.data = p.data.float()
    trainable = sum(p.numel() for p in params)
    model.enable_gradient_checkpointing()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    # The trainer's own loss (qrlora.core.objective through the FLUX backbone): packing, ids, guidance, flow target.
    flux = BACKBONES["flux"]
    schedule = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    objective = Objective(prediction_type="flow", guidance_scale=3.5)
    cfg = TINY_CONFIG if tiny else C.FLUX_DEV_CONFIG
    side, text_len = size["latent"], size["text_len"]
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, cfg["in_channels"] // 4, side, side, device=device, generator=gen, dtype=torch.bfloat16)
    cond = {"prompt_embeds": torch.randn(1, text_len, cfg["joint_attention_dim"], device=device, generator=gen, dtype=torch.bfloat16),
            "pooled_prompt_embeds": torch.randn(1, cfg["pooled_projection_dim"], device=device, generator=gen, dtype=torch.bfloat16),
            "text_ids": torch.zeros(text_len, 3, device=device)}
    amp_device = "cuda" if device == "cuda" else "cpu"

    def step():
        with torch.autocast(amp_device, dtype=torch.bfloat16):
            draws = torch.Generator(device=device).manual_seed(2)
            loss = flux.training_loss(model, latents, cond, schedule, objective, draws).mean()
        loss.backward()
        optimizer.step()
        if constrain is not None:
            constrain(model)
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(size["warmup"]):
        step()
    times = [C.timed(step, sync)[0] for _ in range(size["steps"])]
    out = {"part": "train", "variant": variant, "rank": rank, "init_seconds": init_s, "trainable_params": trainable,
           "quantized_linears": quantized, "step_seconds": times, "step_seconds_median": C.median(times)}
    if device == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_memory_gib"] = C.peak_rss_mib() / 1024
    return out


# ---------------------------------------------------------------------------------------------------------
# Part 5: sharded training (FSDP launch of the trainer)
# ---------------------------------------------------------------------------------------------------------
FSDP_CONFIG = C.REPO_ROOT / "configs" / "accelerate_fsdp.yaml"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_fsdp(device: str, timeout: float = 300) -> dict:
    """4 sharded training steps of the trainer on a tiny FLUX pipeline (checkpoint at 2), then a resume from
    checkpoint-2 to step 4: the sharding line each run logs, seconds, and whether the resume is exact."""
    import shutil
    import time

    import torch

    from qrlora.files.checkpoint import ADAPTER_FILENAME, load_adapter
    from qrlora.toy.tiny import build_tiny_pipeline

    processes = min(2, torch.cuda.device_count()) if device == "cuda" else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_pipeline("flux", tmp / "flux")

        def train(out: Path, *extra: str) -> tuple[float, str]:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
                   "--num_processes", str(processes), "--main_process_port", str(_free_port()),
                   "--mixed_precision", "bf16" if device == "cuda" else "no", "-m", "qrlora.train",
                   "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(C.REPO_ROOT / "assets/cnt/cat"),
                   "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_sequence_length", "16",
                   "--max_train_steps", "4", "--checkpointing_steps", "2", "--lora_init_method", "triu_deltaR",
                   "--gradient_checkpointing", "--output_dir", str(out), *extra]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=C.REPO_ROOT)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:8])} ... exited {proc.returncode}: {proc.stderr[-1500:]}")
            lines = [line.split("qrlora.sharding: ", 1)[1] for line in proc.stderr.splitlines() if "qrlora.sharding: FSDP" in line]
            return seconds, lines[0] if lines else "(no sharding line logged)"

        straight_s, sharding = train(tmp / "straight")
        resumed = tmp / "resumed"
        resumed.mkdir()
        shutil.copytree(tmp / "straight" / "checkpoint-2", resumed / "checkpoint-2")
        resumed_s, _ = train(resumed, "--resume_from_checkpoint", "latest")
        a, b = load_adapter(tmp / "straight" / ADAPTER_FILENAME), load_adapter(resumed / ADAPTER_FILENAME)
        exact = all(torch.equal(t, b.layers[p][n]) for p, named in a.layers.items() for n, t in named.items())
        learned = any(bool(torch.count_nonzero(named["delta_r"])) for named in a.layers.values())
    return {"part": "fsdp", "config": str(FSDP_CONFIG.relative_to(C.REPO_ROOT)), "processes": processes,
            "backend": "nccl" if device == "cuda" else "gloo", "model": "tiny random FLUX pipeline (qrlora.tiny)",
            "sharding": sharding, "straight_seconds": straight_s, "resumed_seconds": resumed_s,
            "resume_exact": exact, "learned": learned, "adapter_layers": len(a.layers)}


# ---------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------
def spawn(part: str, device: str, tiny: bool, workdir: Path, timeout: float, estimate: Path | None = None) -> dict:
    out = workdir / f"{part.replace('+', '_').replace(':', '_')}.json"
    cmd = [sys.executable, "-m", "bench.gpu_flux", "--part", part, "--device", device, "--json-out", str(out)]
    if tiny:
        cmd.append("--tiny-cpu")
    if estimate is not None:
        cmd += ["--memory-estimate", str(estimate)]
    print(f"[gpu_flux] {part} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=C.REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"part": part, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"part": part, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    return json.loads(out.read_text())


def _quantized_precision() -> tuple[str | None, str]:
    """The first of nf4 (bitsandbytes), fp8 (torchao) that this machine can run, or None and why not."""
    try:
        from qrlora.core.quantize import check_available
    except ImportError as err:
        return None, f"qrlora.core.quantize unavailable ({err})"
    reasons = []
    for precision in ("nf4", "fp8"):
        try:
            check_available(precision)
            return precision, ""
        except Exception as err:  # noqa: BLE001 - UserError or a broken install: not available
            reasons.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return None, "; ".join(reasons)


def _available(precision: str) -> bool:
    try:
        from qrlora.core.quantize import check_available

        check_available(precision)
        return True
    except Exception:  # noqa: BLE001 - UserError or a broken install: not available
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/gpu_flux.json)")
    p.add_argument("--tiny-cpu", action="store_true", help="tiny FLUX config on the CPU: a logic check, not a benchmark")
    p.add_argument("--no-quantized", action="store_true", help="skip the quantized-base variants")
    p.add_argument("--no-memory", action="store_true", help="skip part 4 (the flux_memory rows measured)")
    p.add_argument("--memory-estimate", type=Path, default=C.REPO_ROOT / "bench" / "reports" / "flux_memory.json",
                   help="the CPU estimate whose rows part 4 measures (default bench/reports/flux_memory.json)")
    p.add_argument("--memory-output", type=Path, default=None,
                   help="where part 4 writes the estimate with measured beside it (default "
                        "bench/results/flux_memory_measured.json; bench/reports/flux_memory.json fills docs/memory.md)")
    p.add_argument("--memory-budget", type=float, default=240.0, help="seconds part 4 may use (default 240)")
    p.add_argument("--no-fsdp", action="store_true", help="skip part 5 (the trainer's sharded path, FSDP launch)")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES["tiny-cpu" if args.tiny_cpu else "gpu"]

    if args.part:  # child
        if args.part.startswith("memory:"):
            result = run_memory(args.part, args.device, args.tiny_cpu, args.memory_estimate)
        elif args.part == "fsdp":
            result = run_fsdp(args.device)
        else:
            result = run_init(args.device, args.tiny_cpu, size) if args.part == "init" else \
                run_train(args.part, args.device, args.tiny_cpu, size)
        C.write_json(args.json_out, result)
        return 0

    import torch

    if args.tiny_cpu:
        device = "cpu"
    elif not torch.cuda.is_available():
        print(NO_GPU_MESSAGE)
        return 0
    else:
        device = "cuda"
    output = args.output or C.default_output("gpu_flux_tiny_cpu" if args.tiny_cpu else "gpu_flux")
    info = C.machine_info()
    variants = list(TRAIN_VARIANTS)
    skipped = {}
    if args.no_quantized:
        skipped["quantized base"] = "--no-quantized"
    elif device != "cuda":
        skipped["quantized base"] = "needs a CUDA GPU"
    else:
        precision, reason = _quantized_precision()
        if precision:
            variants += [f"{v}+{precision}" for v in TRAIN_VARIANTS]
        else:
            skipped["quantized base"] = reason
    timeout = 600 if device == "cuda" else 300
    with tempfile.TemporaryDirectory() as tmp:
        results = [spawn("init", device, args.tiny_cpu, Path(tmp), timeout)]
        results += [spawn(v, device, args.tiny_cpu, Path(tmp), timeout) for v in variants]
        memory = None
        if args.no_memory:
            skipped["memory rows"] = "--no-memory"
        elif not args.memory_estimate.is_file():
            skipped["memory rows"] = f"no estimate at {args.memory_estimate} (run python -m bench.flux_memory)"
        else:
            bases = ["bf16"] + ([] if device != "cuda" or args.no_quantized else
                                [b for b in ("fp8", "nf4") if _available(b)])
            memory_out = args.memory_output or C.default_output("flux_memory_measured")
            memory = run_memory_parts(device, args.tiny_cpu, args.memory_estimate, memory_out, args.memory_budget,
                                      Path(tmp), bases, info)
            print(f"[gpu_flux] memory rows: {memory_out}", file=sys.stderr)
        fsdp = None
        if args.no_fsdp:
            skipped["fsdp"] = "--no-fsdp"
        else:
            fsdp = spawn("fsdp", device, args.tiny_cpu, Path(tmp), timeout)
    init = results[0]
    train = {r.get("variant", r["part"]): r for r in results[1:]}
    for quant in ("", "+nf4", "+fp8"):
        base, ours = train.get("peft_lora" + quant), train.get("triu_deltaR" + quant)
        if base and ours and "error" not in base and "error" not in ours:
            ours["step_time_ratio"] = ours["step_seconds_median"] / base["step_seconds_median"]
            ours["peak_memory_ratio"] = ours["peak_memory_gib"] / base["peak_memory_gib"]
            ours["trainable_param_ratio"] = ours["trainable_params"] / base["trainable_params"]
    cfg = TINY_CONFIG if args.tiny_cpu else C.FLUX_DEV_CONFIG
    payload = {
        "benchmark": "gpu_flux",
        "mode": "tiny-cpu" if args.tiny_cpu else "gpu",
        "device": device,
        "model": {"class": "FluxTransformer2DModel", "config": cfg, "weights": "random bf16 (no download)"},
        "resolution_px": size["latent"] * 8,
        "rank": size["rank"],
        "gradient_checkpointing": True,
        "precision": "bf16 base, bf16 autocast, float32 trainable parameters",
        "timing": f"median of {size['steps']} steps after {size['warmup']} warm-up steps, one process per variant",
        "machine": info,
        "git_revision": C.git_revision(),
        "skipped": skipped,
        "init": init,
        "train": list(train.values()),
        "memory_measured": None if memory is None else {
            "rows_measured": sum(r.get("measured_peak_gib") is not None for r in memory["rows"]),
            **memory["measured_on"]},
        "fsdp": fsdp,
    }
    C.write_json(output, payload)
    print(render(payload))
    print(f"\nJSON: {output}")
    return 0


def render(payload: dict) -> str:
    m, init = payload["machine"], payload["init"]
    lines = [f"## FLUX.1-dev-sized transformer ({payload['model']['weights']}), rank {payload['rank']}, "
             f"{payload['mode']} on {m.get('gpu', m['cpu'])}, {m['date']}", ""]
    if "error" in init:
        lines.append(f"init FAILED: {init['error']}")
    else:
        e = init["extrapolated_seconds"]
        lines += [f"Init of all {init['layers']} targeted layers:", "",
                  C.markdown_table(["route", "seconds", "speedup vs published"], [
                      ["published (full SVD + dense QR), per shape x count", e["published"], 1.0],
                      ["PEFT pissa_niter_4 SVD + our QR, per shape x count", e["peft_pissa_niter_4"],
                       init["speedup_peft_vs_published"]],
                      ["ours, per shape x count", e["ours"], init["speedup_ours_vs_published_per_shape_sum"]],
                      ["ours, inject_adapters on the whole model (measured)", init["ours_inject_all_layers_seconds"],
                       init["speedup_ours_inject_vs_published"]],
                  ]), ""]
    rows = []
    for r in payload["train"]:
        if "error" in r:
            rows.append([r["part"], "FAILED: " + r["error"].splitlines()[-1][:120], None, None, None, None, None])
            continue
        rows.append([r["variant"], r["step_seconds_median"], r.get("step_time_ratio"), r["peak_memory_gib"],
                     r.get("peak_memory_ratio"), r["trainable_params"], r.get("trainable_param_ratio")])
    lines += [f"Training step, {payload['resolution_px']} px, batch 1, gradient checkpointing, {payload['precision']}; "
              f"{payload['timing']}:", "",
              C.markdown_table(["variant", "step s", "step vs PEFT", "peak GiB", "peak vs PEFT", "trainable params",
                                "params vs PEFT"], rows)]
    if payload.get("fsdp"):
        lines.append("\n" + render_fsdp(payload["fsdp"]))
    for what, why in payload["skipped"].items():
        lines.append(f"\nskipped {what}: {why}")
    return "\n".join(lines)


def render_fsdp(fsdp: dict) -> str:
    """One line for part 5 (the FSDP launch)."""
    if "error" in fsdp:
        return f"FSDP launch FAILED: {fsdp['error'].splitlines()[-1][:200]}"
    return (f"FSDP launch ({fsdp['config']}, {fsdp['backend']}): {fsdp['sharding'].removeprefix('FSDP: ')}; "
            f"4 steps {fsdp['straight_seconds']:.1f} s, resume from step 2 {'exact' if fsdp['resume_exact'] else 'NOT exact'}, "
            f"adapter {'learned' if fsdp['learned'] else 'did NOT learn'}")


if __name__ == "__main__":
    sys.exit(main())
