"""Real-size rehearsal: a published architecture trained, saved, resumed, merged, exported and loaded back, on the
CPU (or one GPU), with random weights and nothing downloaded (issue 28).

    python -m bench.rehearsal --backbone sd3     # SD3-medium's transformer at its published config
    python -m bench.rehearsal --backbone sdxl    # SDXL's 2.6 B UNet
    python -m bench.rehearsal --backbone flux    # FLUX.1-dev at full width, 2 double + 4 single blocks
    python -m bench.rehearsal --backbone flux --device cuda --full-depth    # on a GPU: every block

What is built (``build``): a standard diffusers pipeline folder whose denoiser is ``Backbone.published_config``
(FLUX: its block counts cut to fit a 24 GB host unless ``--full-depth``) with random bf16 weights, stored in bf16 as
the published checkpoints are. Its targeted Linears get a spectrum with a defined top-r subspace (random Gaussian
weights have none): ``W = 0.1 G / sqrt(in) + A diag(4 * 0.97^i) B`` over 128 directions, so ``sigma_64 / sigma_65``
is about 1.03, and the rest of the matrix is a Marchenko-Pastur bulk. The text encoders are random and one or two
layers deep but at their real output widths (CLIP-L 768, CLIP-G 1280 with its projection, T5-XXL 4096) and sequence
lengths (the trainer's ``--max_sequence_length``), with the project's offline tokenizers; the VAE has the real
latent channels, scaling and shift factors and the 8x downsampling of the published one, at narrow widths.

Parts, each in a child process of its own (so each peak is its own, and a part killed at a limit loses only itself),
each writing its JSON under ``--workdir`` as it ends; the parent gathers them into ``--output``:

1. ``decompose``: the trainer's decomposition (``Method.initialize``, float32 from the bf16 weights as loaded) of
   every targeted layer, timed per layer; one layer of each distinct shape checked against the dense SVD (largest
   principal angle, error ratio to the optimal rank-r error, the gap ``sigma_r / sigma_r+1``).
2. ``train``: the real trainer (``qrlora.cli.train``) on the folder, 2 steps at ``--resolution`` (256) with gradient
   checkpointing and bf16 mixed precision, a checkpoint after step 1; step times, the peak resident memory of the
   process, and of the training phase alone (the peak reset once the adapters are in place:
   ``/proc/self/clear_refs``) above the memory the process held before the model loaded.
3. ``resume``: a second run resumed from that checkpoint for the last step; its adapter must equal the first run's
   bit for bit.
4. ``estimate``: the fake-tensor estimator (``bench.flux_memory``'s ``StorageTracker`` under ``FakeTensorMode``) on
   the same denoiser, adapters, inputs and step, beside the measured training-phase peak (the goal: within 15 %).
5. ``merge_export``: a second adapter (the first one's coefficients moved by seeded noise), a merge of both into the
   bf16 model (``Merger``, live on bf16 layers) against both attached live, then every export format: the diffusers
   file loaded back with the pipeline's own ``load_lora_weights`` and its denoiser's output compared with the
   trainer's model (the base plus the adapter file attached); the kohya / ComfyUI file's key names checked against
   the real block counts of the original layout (and, for FLUX, loaded by diffusers' kohya converter too).

CPU figures mean CPU: they check that the code runs at the real shapes and measure its memory, not GPU speed.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

from . import _common as C

PARTS = ("build", "decompose", "train", "resume", "estimate", "merge_export")
RANK = 64
#: Under this many seconds before ``--deadline`` a part is not started (a process start and a model load take more).
MIN_PART_S = 15
SPECTRUM_DIRECTIONS = 128
# FLUX at full width but cut in depth on a 24 GB host (every targeted layer kind present at its real shape).
FLUX_CUT = {"num_layers": 2, "num_single_layers": 4}
# Text encoders at the real output widths: (kind, hidden width, projection) per pipeline component.
TEXT_ENCODERS = {
    "sd3": {"text_encoder": ("clip", 768, True), "text_encoder_2": ("clip", 1280, True), "text_encoder_3": ("t5", 4096, False)},
    "flux": {"text_encoder": ("clip", 768, False), "text_encoder_2": ("t5", 4096, False)},
    "sdxl": {"text_encoder": ("clip", 768, False), "text_encoder_2": ("clip", 1280, True)},
}
# --cpu-dry-run: the same code at reduced width and depth (a logic check; its numbers mean nothing).
DRY_RUN_OVERRIDES = {
    "sd3": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32, "caption_projection_dim": 64},
    "flux": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 1, "attention_head_dim": 128,
             "axes_dims_rope": [16, 56, 56]},
    "sdxl": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], "transformer_layers_per_block": [1, 1, 1]},
}


# ---------------------------------------------------------------------------------------------------------
# Memory of this process (Linux)
# ---------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_gib() -> float:
    return _status_kib("VmRSS") / 2**20


def peak_rss_gib() -> float:
    return _status_kib("VmHWM") / 2**20


def reset_peak_rss() -> None:
    """Give back freed heap pages (glibc keeps them), then restart the peak (VmHWM) from the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


# ---------------------------------------------------------------------------------------------------------
# 0. The pipeline folder
# ---------------------------------------------------------------------------------------------------------
def denoiser_config(backbone, full_depth: bool, dry_run: bool) -> dict:
    config = dict(backbone.published_config)
    if dry_run:
        config.update(DRY_RUN_OVERRIDES[backbone.name])
    elif backbone.name == "flux" and not full_depth:
        config.update(FLUX_CUT)
    return config


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def structured_weight(out_f: int, in_f: int, generator, device="cpu"):
    """The targeted Linears' random weight (module docstring): ``0.1 G / sqrt(in) + A diag(4 * 0.97^i) B`` over
    ``SPECTRUM_DIRECTIONS`` directions, ``G``, ``A`` (scaled by ``1 / sqrt(out)``) and ``B`` (by ``1 / sqrt(in)``)
    Gaussian, drawn in that order from ``generator``; float32. A spike of 128 geometrically decaying directions over a
    Marchenko-Pastur bulk: ``sigma_64 / sigma_65`` about 1.01-1.05 (defined), ``sigma_1`` about 4. Also the
    ``rehearsal`` spectrum of ``bench.decompose``."""
    import torch

    k = SPECTRUM_DIRECTIONS
    sigma = 4.0 * 0.97 ** torch.arange(k, dtype=torch.float32, device=device)
    w = torch.randn(out_f, in_f, generator=generator, device=device) / in_f ** 0.5
    A = torch.randn(out_f, k, generator=generator, device=device) / out_f ** 0.5
    B = torch.randn(k, in_f, generator=generator, device=device) / in_f ** 0.5
    return 0.1 * w + (A * sigma) @ B


def fill_random_(model, targets: set[str], device) -> None:
    """Seeded random weights in place: ``N(0, 1/fan_in)`` for matrices and kernels, ones for norm scales, zeros for
    biases; the targeted Linears get the structured spectrum of the module docstring (``structured_weight``)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator(device=device).manual_seed(_seed(name))
            if p.dim() == 2 and name.removesuffix(".weight") in targets:
                p.copy_(structured_weight(*p.shape, gen, device))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def text_encoder(kind: str, width: int, projection: bool, tokenizer, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if kind == "clip":
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width, projection_dim=width,
                                num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=77,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=1024, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def build(args) -> dict:
    """The pipeline folder: the tiny pipeline's tokenizers, scheduler and VAE config, with the real-size denoiser and
    real-width text encoders swapped in."""
    import diffusers
    import torch

    from qrlora.backbones import BACKBONES
    from qrlora.core.inject import find_target_modules
    from qrlora.toy.tiny import build_tiny_pipeline

    backbone = BACKBONES[args.backbone]
    folder = Path(args.workdir) / "pipeline"
    tiny = build_tiny_pipeline(backbone.name, Path(args.workdir) / "tiny")
    pipe = backbone.pipeline_cls().from_pretrained(tiny)
    config = denoiser_config(backbone, args.full_depth, args.dry_run)
    start = time.perf_counter()
    with torch.device("meta"):
        denoiser = getattr(diffusers, backbone.denoiser_class).from_config(config)
    denoiser = denoiser.to_empty(device=args.device).requires_grad_(False)
    targets = set(find_target_modules(denoiser, list(backbone.default_targets)))
    fill_random_(denoiser, targets, args.device)
    denoiser = denoiser.to("cpu", torch.bfloat16)
    built_s = time.perf_counter() - start
    encoders = {}
    for i, (component, (kind, width, projection)) in enumerate(TEXT_ENCODERS[backbone.name].items()):
        tokenizer = getattr(pipe, component.replace("text_encoder", "tokenizer"))
        encoders[component] = text_encoder(kind, width, projection, tokenizer, seed=i).to(torch.bfloat16)
    pipe.register_modules(**{backbone.denoiser_name: denoiser}, **encoders)
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    pipe.save_pretrained(folder)
    shapes: dict[str, int] = {}
    for path in targets:
        shape = "x".join(map(str, denoiser.get_submodule(path).weight.shape))
        shapes[shape] = shapes.get(shape, 0) + 1
    return {"denoiser_params": sum(p.numel() for p in denoiser.parameters()), "denoiser_config": config,
            "targeted_layers": len(targets), "targeted_shapes": shapes, "build_s": built_s,
            "save_s": time.perf_counter() - start, "stored_dtype": "bfloat16",
            "text_encoders": {k: {"kind": v[0], "width": v[1], "projection": v[2]} for k, v in TEXT_ENCODERS[backbone.name].items()}}


# ---------------------------------------------------------------------------------------------------------
# 1. Decomposition
# ---------------------------------------------------------------------------------------------------------
def decompose_part(args) -> dict:
    import torch

    from qrlora.backbones import BACKBONES
    from qrlora.core import decompose
    from qrlora.core.decompose import principal_angle_deg
    from qrlora.core.inject import find_target_modules
    from qrlora.core.methods import AdapterConfig, get_method

    backbone = BACKBONES[args.backbone]
    denoiser = backbone.load_denoiser(str(Path(args.workdir) / "pipeline"))  # as stored: bf16
    cfg = AdapterConfig(method="triu_deltaR", rank=args.rank)
    method = get_method(cfg.method)
    per_layer, checked = [], {}
    total = time.perf_counter()
    paths = find_target_modules(denoiser, list(backbone.default_targets))
    counts: dict[str, int] = {}
    for path in paths:
        shape = "x".join(map(str, denoiser.get_submodule(path).weight.shape))
        counts[shape] = counts.get(shape, 0) + 1
    if not args.every_layer:  # one layer per shape, timed; the train part's injection times every layer
        firsts = {}
        for path in paths:
            firsts.setdefault("x".join(map(str, denoiser.get_submodule(path).weight.shape)), path)
        paths = list(firsts.values())
    for path in paths:
        weight = denoiser.get_submodule(path).weight
        start = time.perf_counter()
        with torch.no_grad(), decompose.recorded_gaps() as gaps:
            t = method.initialize(weight.to(args.device), cfg, path)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        shape = "x".join(map(str, weight.shape))
        per_layer.append({"layer": path, "shape": shape, "seconds": seconds, "gap": min(gaps, default=None)})
        if shape not in checked:  # the dense SVD of one layer per shape: the faithful-subspace check
            W = weight.float().to(args.device)
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            r = args.rank
            optimal = float(S[r:].double().pow(2).sum().sqrt())
            err = float((W - cfg.scale * (t["q"] @ t["base_r"])).double().norm())
            checked[shape] = {"layer": path, "angle_deg": principal_angle_deg(t["q"].cpu(), U[:, :r].cpu()),
                              "error_ratio": err / optimal if optimal else None,
                              "gap": float(S[r - 1] / S[r]), "sigma_1": float(S[0]), "sigma_r": float(S[r - 1])}
    total = time.perf_counter() - total
    by_shape: dict[str, dict] = {}
    for row in per_layer:
        entry = by_shape.setdefault(row["shape"], {"layers": counts[row["shape"]], "timed": 0, "seconds": 0.0})
        entry["timed"] += 1
        entry["seconds"] += row["seconds"]
    if not args.every_layer:  # the timed layer of each shape stands for every layer of that shape
        total = sum(e["seconds"] / e["timed"] * e["layers"] for e in by_shape.values())
    layers = sum(counts.values())
    return {"rank": args.rank, "layers": layers, "timed_layers": len(per_layer), "total_s": total,
            "total_is": "measured over every layer" if args.every_layer else "one timed layer per shape x its count",
            "seconds_per_layer": total / max(layers, 1), "by_shape": by_shape, "checked": checked,
            "worst_angle_deg": max((c["angle_deg"] for c in checked.values()), default=None),
            "worst_error_ratio": max((c["error_ratio"] or 0 for c in checked.values()), default=None),
            "weights": "bfloat16 as stored, decomposed in float32 (the trainer's way)",
            "spectrum": "0.1 G/sqrt(in) + A diag(4 * 0.97^i) B over 128 directions (module docstring)"}


# ---------------------------------------------------------------------------------------------------------
# 2-3. Training, checkpoint, resume (the real trainer)
# ---------------------------------------------------------------------------------------------------------
def train_flags(args, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(Path(args.workdir) / "pipeline"),
            "--instance_data_dir", str(C.REPO_ROOT / "assets" / "cnt" / "cat"), "--instance_prompt", "a photo of sks cat",
            "--resolution", str(args.resolution), "--rank", str(args.rank), "--lora_init_method", "triu_deltaR",
            "--max_train_steps", "2", "--checkpointing_steps", "1", "--gradient_checkpointing",
            "--mixed_precision", "bf16", "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


def run_trainer(flags: list[str]) -> dict:
    """The trainer in this process, timed: the injection, each optimizer update, and the training-phase peak."""
    import torch

    import qrlora.training.trainer as trainer
    from qrlora.cli.train import main

    marks: dict[str, list[float]] = {"updates": []}
    memory = {"before_load_gib": rss_gib()}
    inject, build_optimizer, constrain = trainer.inject_adapters, trainer.build_optimizer, trainer.apply_constraints_

    def timed_inject(*a, **k):
        start = time.perf_counter()
        report = inject(*a, **k)
        marks["inject_s"] = [time.perf_counter() - start]
        return report

    def marked_optimizer(*a, **k):  # right after the model is in place: the training phase starts here
        memory["model_in_place_gib"] = rss_gib()
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            memory["cuda_model_in_place_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        memory["training_start_gib"] = rss_gib()
        marks["updates"].append(time.perf_counter())
        return build_optimizer(*a, **k)

    def marked_update(model):
        constrain(model)
        marks["updates"].append(time.perf_counter())

    trainer.inject_adapters, trainer.build_optimizer, trainer.apply_constraints_ = timed_inject, marked_optimizer, marked_update
    start = time.perf_counter()
    try:
        final = main(flags)
    finally:
        trainer.inject_adapters, trainer.build_optimizer, trainer.apply_constraints_ = inject, build_optimizer, constrain
    memory["training_peak_gib"] = peak_rss_gib()
    if torch.cuda.is_available():  # on a GPU the training phase's peak is the allocator's
        memory["cuda_training_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    memory["training_peak_above_start_gib"] = memory["training_peak_gib"] - memory["before_load_gib"]
    times = marks["updates"]
    return {"adapter": str(final), "wall_s": time.perf_counter() - start, "inject_s": marks.get("inject_s", [None])[0],
            "update_s": [b - a for a, b in zip(times, times[1:])], "memory": memory}


def train_part(args) -> dict:
    out = Path(args.workdir) / "run_a"
    shutil.rmtree(out, ignore_errors=True)
    result = run_trainer(train_flags(args, out))
    result["resolution"] = args.resolution
    result["checkpoints"] = sorted(p.name for p in out.glob("checkpoint-*"))
    return result


def resume_part(args) -> dict:
    import torch

    from qrlora.files.checkpoint import load_adapter

    a, b = Path(args.workdir) / "run_a", Path(args.workdir) / "run_b"
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir(parents=True)
    shutil.copytree(a / "checkpoint-1", b / "checkpoint-1")
    result = run_trainer(train_flags(args, b, "--resume_from_checkpoint", "latest"))
    straight, resumed = load_adapter(a / "pytorch_lora_weights.safetensors"), load_adapter(result["adapter"])
    differing = [f"{p}.{n}" for p, t in straight.layers.items() for n, v in t.items()
                 if not torch.equal(v, resumed.layers[p][n])]
    result.update({"bit_exact": not differing, "differing_tensors": differing[:5], "tensors": sum(len(t) for t in straight.layers.values())})
    return result


# ---------------------------------------------------------------------------------------------------------
# 4. The fake-tensor estimate of the same step
# ---------------------------------------------------------------------------------------------------------
def step_inputs(backbone, folder: str, resolution: int, device: str = "cpu"):
    """Real conditioning of one prompt (the folder's text encoders) and latents of the VAE's shape, bf16."""
    import torch

    text = backbone.load_text_pipeline(folder, torch.bfloat16)
    table = backbone.encode_prompts(text, ["a photo of sks cat"], device, backbone.default_max_sequence_length)
    size = torch.tensor([[resolution, resolution]])  # one square image, uncropped (SDXL's micro-conditioning)
    cond = backbone.batch_cond(table, {"prompt_ids": torch.tensor([0]), "original_size": size,
                                       "crop_top_left": torch.zeros_like(size), "target_size": size})
    vae_config = backbone.load_vae(folder).config
    side = resolution // 8
    latents = torch.randn(1, vae_config.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in cond.items()}, latents.to(torch.bfloat16)


def estimate_part(args) -> dict:
    import diffusers
    import torch
    from torch._subclasses import FakeTensorMode

    from bench.flux_memory import StorageTracker, fake_tensors_, warm_optimizer_
    from qrlora.backbones import BACKBONES
    from qrlora.core.inject import attach_adapter, find_target_modules
    from qrlora.core.layers import apply_constraints_
    from qrlora.core.methods import AdapterConfig, get_method

    backbone = BACKBONES[args.backbone]
    folder = str(Path(args.workdir) / "pipeline")
    cond, latents = step_inputs(backbone, folder, args.resolution)
    scheduler = backbone.load_scheduler(folder)
    objective, schedule = backbone.objective(scheduler), backbone.noise_schedule(scheduler)
    config = getattr(diffusers, backbone.denoiser_class).load_config(folder, subfolder=backbone.denoiser_name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = getattr(diffusers, backbone.denoiser_class).from_config(config).requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    adapter = AdapterConfig(method="triu_deltaR", rank=args.rank)
    method = get_method(adapter.method)
    layers = {}
    for path in find_target_modules(model, list(backbone.default_targets)):
        out_f, in_f = model.get_submodule(path).weight.shape
        layers[path] = {n: torch.zeros(s, device="meta") for n, s in method.shapes(out_f, in_f, adapter).items()}
    attach_adapter(model, adapter, layers, trainable=True)
    model.enable_gradient_checkpointing()
    model.train()
    mode = FakeTensorMode()
    fake_tensors_(model, mode)
    import dataclasses

    schedule = dataclasses.replace(schedule, **{f.name: mode.from_tensor(getattr(schedule, f.name))
                                                for f in dataclasses.fields(schedule)
                                                if isinstance(getattr(schedule, f.name), torch.Tensor)})
    shapes = {k: (v.shape, v.dtype) for k, v in cond.items()}
    with mode:  # inputs of the real shapes made inside the mode, as the step's own tensors
        cond = {k: torch.randn(shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
                for k, (shape, dtype) in shapes.items()}
        latents = torch.randn(latents.shape, dtype=latents.dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        tracker = StorageTracker(model, params)
        with tracker:
            with tracker.phase("optimizer"):
                warm_optimizer_(optimizer)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = backbone.training_loss(model, latents, cond, schedule, objective,
                                              torch.Generator().manual_seed(1)).mean()
            tracker.mark("after_forward")
            loss.backward()
            del loss
            with tracker.phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            apply_constraints_(model)
            optimizer.zero_grad(set_to_none=True)
        tracker.close()
    gib = {k: v / 2**30 for k, v in tracker.peak.items()}
    vae_bytes = sum(p.numel() * p.element_size() for p in backbone.load_vae(folder).parameters())
    return {"peak_gib": gib, "vae_gib": vae_bytes / 2**30, "estimate_gib": gib["total"] + vae_bytes / 2**30,
            "trainable_params": sum(p.numel() for p in params),
            "what": "denoiser (bf16) + adapters + AdamW state + gradients + activations of one step at the trainer's "
                    "resolution with checkpointing, plus the VAE the trainer keeps for encoding (float32)"}


# ---------------------------------------------------------------------------------------------------------
# 5. Merge and exports, loaded back
# ---------------------------------------------------------------------------------------------------------
def norm_ratio(num, den) -> float:
    return float(num.float().norm() / den.float().norm())


def merge_export_part(args) -> dict:
    import dataclasses

    import torch

    from qrlora.backbones import BACKBONES
    from qrlora.core.inject import attach_adapter, set_adapter_weights
    from qrlora.files.checkpoint import load_adapter, save_adapter
    from qrlora.files.export import export_lora
    from qrlora.merging.merger import Merger

    backbone = BACKBONES[args.backbone]
    folder = str(Path(args.workdir) / "pipeline")
    first = load_adapter(Path(args.workdir) / "run_a" / "pytorch_lora_weights.safetensors")
    gen = torch.Generator().manual_seed(7)
    moved = {}
    for p, t in first.layers.items():  # coefficients moved by seeded noise, inside the method's constraint (triu)
        moved[p] = dict(t)
        for n in first.method.trainable:
            mask = first.method.grad_mask(n, t)
            noise = torch.randn(t[n].shape, generator=gen) * float(t["base_r" if "base_r" in t else n].abs().mean()) * 0.01
            moved[p][n] = t[n] + (noise if mask is None else noise * mask)
    second_path = Path(args.workdir) / "second.safetensors"
    save_adapter(second_path, dataclasses.replace(first, layers=moved))
    second = load_adapter(second_path)
    objective = backbone.objective(backbone.load_scheduler(folder))
    cond, latents = step_inputs(backbone, folder, args.resolution)  # one fixed denoiser call at t = 500
    # The denoiser calls run on --device: on a GPU host FLUX at full depth is 12 B parameters, minutes a call on its CPU.
    device = torch.device(args.device)
    cond = {k: v.to(device) for k, v in cond.items()}
    latents, timesteps = latents.to(device), torch.tensor([500.0], device=device)
    out: dict = {}

    def call(model, dtype=torch.bfloat16):
        c = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        with torch.no_grad():
            return backbone.predict(model, latents.to(dtype), timesteps, c, objective).float()

    # Merge: both adapters into the bf16 model (live on bf16 layers) against both attached live.
    model = backbone.load_denoiser(folder).eval().to(device)
    base_out = call(model)
    merger = Merger(model, [first, second])
    start = time.perf_counter()
    merger.merge([1.0, 0.8])
    out["merge_s"] = time.perf_counter() - start
    merged_out = call(model)
    merger.restore()
    attach_adapter(model, first.config, first.layers, adapter_name="a", weight=1.0)
    attach_adapter(model, second.config, second.layers, adapter_name="b", weight=0.8)
    live_out = call(model)
    del model, merger

    # The float32 truth of the pair (the bf16 checkpoint upcast exactly), against which the bf16 merge and the bf16
    # live pair are both measured, relative to the pair's change: the merge is right when its error is the live
    # pair's own (bf16 rounding), not more.
    model = backbone.load_denoiser(folder, torch.float32).eval().to(device)
    base32 = call(model, torch.float32)
    attach_adapter(model, first.config, first.layers, adapter_name="a", weight=1.0)
    attach_adapter(model, second.config, second.layers, adapter_name="b", weight=0.8)
    truth = call(model, torch.float32)
    change = truth - base32
    out["merge"] = {"weights": [1.0, 0.8], "dtype": "bfloat16",
                    "pair_change_relative_to_output": norm_ratio(change, base32),
                    "merged_bf16_error_relative_to_change": norm_ratio(merged_out - truth, change),
                    "live_bf16_error_relative_to_change": norm_ratio(live_out - truth, change)}
    # Exports of the second adapter, loaded back, compared in float32 with the trainer's model: the base plus the
    # adapter file attached.
    set_adapter_weights(model, {"a": 0.0, "b": 1.0})
    ours = call(model, torch.float32)
    del model
    exports = {"adapter_change_relative_to_output": norm_ratio(ours - base32, base32)}

    def loaded_back(path: Path) -> float:
        pipe = backbone.pipeline_cls().from_pretrained(folder, torch_dtype=torch.float32)
        pipe.load_lora_weights(str(path))
        got = call(getattr(pipe, backbone.denoiser_name).to(device), torch.float32)
        del pipe
        return norm_ratio(got - ours, ours - base32)  # relative to the adapter's change, not to the output

    diffusers_file = export_lora(second, Path(args.workdir) / "export_diffusers.safetensors", "diffusers")
    exports["diffusers"] = {"file": diffusers_file.name, "loaded_by": f"{backbone.pipeline_class}.load_lora_weights",
                            "relative_difference": loaded_back(diffusers_file)}
    kohya_file = export_lora(second, Path(args.workdir) / "export_kohya.safetensors", "kohya", backbone.name)
    exports["kohya"] = kohya_check(backbone, kohya_file, folder, len(second.layers))
    # diffusers reads kohya's FLUX layout too (the strongest check of the names); its converter hard-codes FLUX.1's
    # 3072 width, so only the real width can be loaded that way.
    if backbone.name == "flux" and backbone.published_config["num_attention_heads"] == \
            json.loads(Path(folder, backbone.denoiser_name, "config.json").read_text())["num_attention_heads"]:
        exports["kohya"]["relative_difference"] = loaded_back(kohya_file)
        exports["kohya"]["loaded_by"] = "FluxPipeline.load_lora_weights (kohya converter)"
    out["exports"] = exports
    return out


def kohya_check(backbone, path: Path, folder: str, adapted_layers: int) -> dict:
    """Module names of the kohya file against the original layout's blocks at this model's real block counts; a
    family that keeps diffusers' names (SDXL: no original layout) has one kohya module per adapted layer."""
    import diffusers
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        modules = {k.rsplit(".", 2)[0] for k in f.keys()}
    config = getattr(diffusers, backbone.denoiser_class).load_config(folder, subfolder=backbone.denoiser_name)
    expected_blocks = {}
    for attr, key in backbone.block_lists:
        expected_blocks[attr] = int(config[key])
    indices: dict[str, set[int]] = {}
    for m in modules:
        match = re.match(r"lora_unet_([a-z_]+?)_(\d+)_", m)
        if match:
            indices.setdefault(match.group(1), set()).add(int(match.group(2)))
    counts = {name: len(found) for name, found in indices.items()}
    complete = {name: found == set(range(max(found) + 1)) for name, found in indices.items()}
    matches = (sorted(counts.values()) == sorted(expected_blocks.values()) if backbone.original_layout
               else len(modules) == adapted_layers)
    return {"file": path.name, "modules": len(modules), "adapted_layers": adapted_layers, "blocks_per_prefix": counts,
            "contiguous": complete, "denoiser_block_counts": expected_blocks, "matches_block_counts": matches,
            "example": sorted(modules)[:3]}


# ---------------------------------------------------------------------------------------------------------
# Driver: one child per part, results gathered as they come
# ---------------------------------------------------------------------------------------------------------
PART_FUNCTIONS = {"build": build, "decompose": decompose_part, "train": train_part, "resume": resume_part,
                  "estimate": estimate_part, "merge_export": merge_export_part}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=["sd3", "sdxl", "flux"], required="--table" not in (argv or sys.argv))
    p.add_argument("--table", action="store_true", help="write the docs table from the committed reports and stop")
    p.add_argument("--output", help="report JSON (default: bench/reports/rehearsal_<backbone>.json; with --cpu-dry-run "
                                    "bench/results/)")
    p.add_argument("--workdir", help="where the pipeline and runs go (default: a folder under bench/results/)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the decomposition and the random weights run there)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--full-depth", action="store_true", help="FLUX with all 19 + 38 blocks (a GPU host)")
    p.add_argument("--cpu-dry-run", dest="dry_run", action="store_true",
                   help="the same code at reduced width and depth on the CPU (a logic check for the tests)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--every-layer", action="store_true", help="decompose part: time every targeted layer, not one per shape")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--timeout", type=int, default=3600, help="seconds one part may take")
    p.add_argument("--deadline", type=float, default=None,
                   help="a Unix time no part may run past (bench/gpu_check.sh: one call's budget); a part that "
                        f"would have under {MIN_PART_S} s is recorded as not started")
    return p.parse_args(argv)


def part_timeout(timeout: float, deadline: float | None, now: float) -> float | None:
    """Seconds the next part may run: ``timeout``, cut to what is left before ``deadline``; None when under
    ``MIN_PART_S`` is left (the part is not started)."""
    left = timeout if deadline is None else min(timeout, deadline - now)
    return left if left >= MIN_PART_S else None


def main(argv=None) -> dict:
    args = parse(argv)
    if args.table:
        print(f"wrote {write_table()}")
        return {}
    name = f"rehearsal_{args.backbone}{'_dry' if args.dry_run else ''}"
    args.workdir = args.workdir or str(C.RESULTS_DIR / name)
    if args.dry_run:
        args.rank, args.resolution = min(args.rank, 8), min(args.resolution, 64)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.part:  # child
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = {"part": args.part, "peak_rss_gib": None}
        start = time.perf_counter()
        result.update(PART_FUNCTIONS[args.part](args))
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_gib"] = peak_rss_gib() if args.part not in ("train", "resume") else result["memory"]["training_peak_gib"]
        result["process_peak_rss_gib"] = C.peak_rss_mib() / 1024
        C.write_json(Path(args.workdir) / f"part_{args.part}.json", result)
        return result
    output = Path(args.output) if args.output else (C.RESULTS_DIR if args.dry_run else C.REPO_ROOT / "bench" / "reports") / f"{name}.json"
    report = {"backbone": args.backbone, "device": args.device, "resolution": args.resolution, "rank": args.rank,
              "dry_run": args.dry_run, "full_depth": args.full_depth, "machine": C.machine_info(),
              "command": " ".join(["python -m bench.rehearsal", *(argv if argv is not None else sys.argv[1:])]), "parts": {}}
    if output.exists():  # a rerun of some parts keeps the others' results
        previous = json.loads(output.read_text())
        if (previous.get("resolution"), previous.get("rank"), previous.get("full_depth")) == (args.resolution, args.rank, args.full_depth):
            report["parts"] = previous.get("parts", {})
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        child = [sys.executable, "-m", "bench.rehearsal", "--part", part, "--backbone", args.backbone, "--workdir",
                 args.workdir, "--device", args.device, "--resolution", str(args.resolution), "--rank", str(args.rank)]
        child += ["--full-depth"] * args.full_depth + ["--cpu-dry-run"] * args.dry_run + ["--every-layer"] * args.every_layer
        limit = part_timeout(args.timeout, args.deadline, time.time())
        if limit is None:  # the call's budget is spent: say so for this part and every later one, run none
            for late in parts[parts.index(part):]:
                report["parts"][late] = {"part": late, "failed": True, "not_started": True,
                                         "error": f"not started: under {MIN_PART_S} s left before --deadline"}
            print(f"[rehearsal {args.backbone}] {part}: not started, the deadline is near", flush=True)
            report["summary"] = summary(report["parts"])
            C.write_json(output, report)
            break
        print(f"[rehearsal {args.backbone}] {part} ...", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(C.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            proc = subprocess.run(child, env=env, timeout=limit, capture_output=True, text=True)
            ok = proc.returncode == 0
            tail = (proc.stderr or "")[-1500:]
        except subprocess.TimeoutExpired:
            ok, tail = False, f"killed after {limit:.0f} s"
        result_file = Path(args.workdir) / f"part_{part}.json"
        if ok and result_file.exists():
            report["parts"][part] = json.loads(result_file.read_text())
            result_file.unlink()
        else:
            report["parts"][part] = {"part": part, "failed": True, "error": tail}
        print(f"[rehearsal {args.backbone}] {part}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s", flush=True)
        report["summary"] = summary(report["parts"])
        C.write_json(output, report)  # after every part: a later part killed loses only itself
        if not ok and part in ("build", "train"):  # every later part reads the pipeline / the first run
            print(f"[rehearsal {args.backbone}] stopped: the later parts need {part}\n{tail}", flush=True)
            break
    print(json.dumps(report["summary"], indent=1))
    return report


def summary(parts: dict) -> dict:
    """The headline numbers: peak vs estimate, step time, decomposition time, resume, exports."""
    train, est = parts.get("train", {}), parts.get("estimate", {})
    memory = train.get("memory", {}) if not train.get("failed") else {}
    measured = memory.get("cuda_training_peak_gib", memory.get("training_peak_above_start_gib"))
    estimate = est.get("estimate_gib") if not est.get("failed") else None
    exports = parts.get("merge_export", {}).get("exports", {})
    return {
        "failed_parts": [k for k, v in parts.items() if v.get("failed")],
        "measured_training_peak_gib": measured,
        "estimated_training_peak_gib": estimate,
        "estimate_over_measured": estimate / measured if measured and estimate else None,
        "step_s": (train.get("update_s") or [None])[-1],
        "decompose_total_s": parts.get("decompose", {}).get("total_s"),
        "trainer_inject_s": train.get("inject_s"),  # the trainer's injection: every layer decomposed, measured
        "decompose_worst_angle_deg": parts.get("decompose", {}).get("worst_angle_deg"),
        "resume_bit_exact": parts.get("resume", {}).get("bit_exact"),
        "exports_relative_difference": {k: v.get("relative_difference") for k, v in exports.items() if isinstance(v, dict)},
        "kohya_matches_block_counts": exports.get("kohya", {}).get("matches_block_counts"),
    }


TABLE_PAGE = C.REPO_ROOT / "docs" / "real-size.md"
TABLE_MARKERS = ("<!-- rehearsal-table:start -->", "<!-- rehearsal-table:end -->")


def render_table(reports: dict[str, dict]) -> str:
    """The docs table of the committed reports (``python -m bench.rehearsal --table`` writes it into the page)."""
    rows = []
    for name, r in reports.items():
        s, build = r["summary"], r["parts"].get("build", {})
        ratio = s.get("estimate_over_measured")
        rows.append([name, f"{build.get('denoiser_params', 0) / 1e9:.2f} B", build.get("targeted_layers"),
                     f"{C.fmt(s.get('trainer_inject_s') or s.get('decompose_total_s'))} s", C.fmt(s.get("decompose_worst_angle_deg")),
                     f"{C.fmt(s.get('step_s'))} s", C.fmt(s.get("measured_training_peak_gib")),
                     C.fmt(s.get("estimated_training_peak_gib")), C.fmt(ratio), s.get("resume_bit_exact"),
                     C.fmt(s.get("exports_relative_difference", {}).get("diffusers")),
                     s.get("kohya_matches_block_counts")])
    headers = ["backbone", "denoiser", "targeted layers", "decomposition (the trainer's, every layer)", "worst angle (deg)", "step (256 px)",
               "training peak (GiB, measured)", "estimate (GiB)", "estimate / measured", "resume bit-exact",
               "diffusers export vs ours (relative to the change)", "kohya names at real block counts"]
    machine = next(iter(reports.values()))["machine"] if reports else {}
    return (f"Measured on {machine.get('cpu', 'this CPU')} ({machine.get('logical_cpus', '?')} logical CPUs, load "
            f"average {machine.get('load_average_at_start')} at the start: other jobs shared the cores), rank {RANK}, "
            "bf16 mixed precision, gradient checkpointing, batch 1 (`python -m bench.rehearsal --table` regenerates "
            "this table from `bench/reports/rehearsal_*.json`):\n\n" + C.markdown_table(headers, rows))


def write_table() -> Path:
    reports = {b: json.loads(p.read_text()) for b in ("sd3", "sdxl", "flux")
               if (p := C.REPO_ROOT / "bench" / "reports" / f"rehearsal_{b}.json").exists()}
    text = TABLE_PAGE.read_text()
    start, end = text.index(TABLE_MARKERS[0]) + len(TABLE_MARKERS[0]), text.index(TABLE_MARKERS[1])
    TABLE_PAGE.write_text(text[:start] + "\n" + render_table(reports) + "\n" + text[end:])
    return TABLE_PAGE


if __name__ == "__main__":
    main()
