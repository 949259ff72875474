"""Build the CPU world: train a VAE, a text-to-image SD3 transformer and the classifier from scratch, seeded.

Stages (each with a progress bar), timed and recorded in ``world.json``:

1. render the data (``qrlora.toy.world.data``): every (shape, style) pair for the VAE and the classifier, only the
   *trained* pairs for the denoiser (the held-out shape and style never reach it, nor the held-out combinations
   of seen words, ``data.HELD_OUT_PAIRS``);
2. classifier (``qrlora.toy.world.classifier``), trained in a second process so both cores work from the start;
3. VAE: a 3-block ``AutoencoderKL`` (image 32 px <-> latent 8 x 8 x ``LATENT_CHANNELS``), L2 + a small KL term;
   ``scaling_factor`` / ``shift_factor`` are set from the latents' statistics so they are ~N(0, 1) as in SD3;
4. denoiser: an ``SD3Transformer2DModel`` (patch 2 -> 16 image tokens) trained with SD3's flow-matching objective
   (logit-normal timesteps, shifted by the scheduler's shift 3), 10% empty-prompt dropout for guidance, EMA;
5. the pipeline (frozen tiny CLIP x2 + T5 encoders from ``qrlora.toy.tiny``, tokenizers learned from the world's
   captions; pooled embeddings zeroed, see ``make_text_pipeline``) is saved with ``save_pretrained`` and reloaded;
   seen prompts are sampled through the reloaded ``StableDiffusion3Pipeline`` and scored by the classifier.

The output folder is a standard SD3 diffusers folder (every tool loads it) plus ``classifier.safetensors``,
``world.json`` (spec, measured accuracies, timings, the command) and a ``README.md``.
"""
from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import UserError
from ..tiny import (
    build_clip_text_encoder,
    build_clip_tokenizer,
    build_t5_encoder,
    build_t5_tokenizer,
    flow_match_scheduler,
    no_progress_bars,
    seeded,
)
from . import data
from .optim import warmup_cosine
from .classifier import CLASSIFIER_FILE, load_classifier, predict, save_classifier, train_classifier
from .world import FLUX_RANK, FLUX_WIDTH, SAMPLE_GUIDANCE, SAMPLE_STEPS, WORLD_FILE, flux_ratio_rank, sample_images

CLIP_LENGTH = 10  # CLIP tokenizers' model_max_length: "<bos> a triangle in gradient style <eos>" is 7 tokens
MAX_SEQUENCE_LENGTH = 8  # the T5 prompt length the denoiser is trained with: pass --max_sequence_length 8 to tools
LATENT_CHANNELS = 8
CLIP_WIDTH = 32  # the tiny CLIP encoders' width (qrlora.toy.tiny); pooled = both concatenated
TEXT_WIDTH = 2 * CLIP_WIDTH  # T5 width = joint attention width: SD3 pads the CLIP states up to it
VAE_BATCH = 32
def make_vae(seed: int):
    """3-block AutoencoderKL (vae_scale_factor 4): image (B, 3, 32, 32) <-> latent (B, 8, 8, 8); SD3-style, no quant convs.

    Channels (16, 32, 32): 246k parameters, ~0.2 s per batch of 32 on one core (64 channels at 32 px cost 2.5x).
    """
    from diffusers import AutoencoderKL

    with seeded(seed, "vae"):
        return AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
            latent_channels=LATENT_CHANNELS, sample_size=data.IMAGE_SIZE,
            use_quant_conv=False, use_post_quant_conv=False,
        )


def make_transformer(seed: int, width: int, layers: int):
    """MMDiT on the 8 x 8 latent: patch 2 -> 16 tokens of ``width`` (heads of 32); context = 10 CLIP + 8 T5 tokens."""
    from diffusers import SD3Transformer2DModel

    with seeded(seed, "transformer"):
        return SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=layers, attention_head_dim=32, num_attention_heads=width // 32,
            joint_attention_dim=TEXT_WIDTH, caption_projection_dim=width, pooled_projection_dim=TEXT_WIDTH,
            pos_embed_max_size=8,
        )


def make_text_pipeline(seed: int):
    """The frozen text side: two tiny CLIP encoders and a tiny T5 (random, from ``qrlora.toy.tiny``), tokenizers learned
    from the world's captions so every shape and style word is one token (words outside them are byte pieces for
    CLIP and ``<unk>`` for T5)."""
    lines = data.corpus()
    clip_tok, clip_tok_2 = (build_clip_tokenizer(lines, model_max_length=CLIP_LENGTH) for _ in range(2))
    t5_tok = build_t5_tokenizer(lines, model_type="word")  # one piece per word: "a triangle in gradient style" = 6
    text = dict(
        text_encoder=build_clip_text_encoder(clip_tok, seed, "text_encoder", with_projection=True), tokenizer=clip_tok,
        text_encoder_2=build_clip_text_encoder(clip_tok_2, seed, "text_encoder_2", with_projection=True),
        tokenizer_2=clip_tok_2,
        text_encoder_3=build_t5_encoder(t5_tok, seed, "text_encoder_3", d_model=TEXT_WIDTH), tokenizer_3=t5_tok,
    )
    # Pooled prompt embeddings are zero by construction (both CLIP ``text_projection`` weights zeroed): a random
    # frozen CLIP's pooled vector (EOS state) is a hash of the whole prompt, so a denoiser trained through it learns
    # each (shape, style) prompt as one key and composes nothing new (a first build: content and style adapters
    # each learned, merged they gave 0% of both). Without it the prompt reaches the denoiser only through its
    # token states, where CLIP's causal "shape" token does not depend on the style word that follows it.
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            text[name].text_projection.weight.zero_()
    return text


def encode(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings exactly as the trainer and the pipeline compute them: (P, 18, 64) and pooled (P, 64)."""
    from ...backbones import BACKBONES

    with torch.no_grad():
        cond = BACKBONES["sd3"].encode_prompts(pipe, prompts, "cpu", MAX_SEQUENCE_LENGTH)
    return cond["prompt_embeds"], cond["pooled_prompt_embeds"]


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, seed: int, kl_weight: float = 1e-5) -> float:
    """Fit the VAE to (N, 3, 32, 32) images in [-1, 1]; return the PSNR (dB, on [0, 1] pixels) of a held-out slice."""
    gen = torch.Generator().manual_seed(seed)
    train, test = images[:-256], images[-256:]
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warmup=steps // 20, floor=0.05)
    vae.train()
    bar = tqdm(range(steps), desc="vae", leave=False)
    for _ in bar:
        x = train[torch.randint(0, len(train), (batch_size,), generator=gen)]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(gen)).sample
        loss = F.mse_loss(recon, x) + kl_weight * dist.kl().mean() / dist.mean[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        mse = F.mse_loss(vae.decode(vae.encode(test).latent_dist.mode()).sample.clamp(-1, 1), test).item()
    return 10 * math.log10(4.0 / mse)  # pixels span 2 in [-1, 1]: MSE on [0, 1] is mse / 4


def train_denoiser(transformer, latents_mean, latents_std, prompt_ids, cond, uncond, *, steps: int,
                   batch_size: int, lr: float, seed: int, shift: float, dropout: float = 0.1, ema_decay: float = 0.999):
    """SD3 flow matching on (N, C, 8, 8) latent distributions; returns the EMA copy of the transformer.

    ``cond`` = (embeds (P, 18, 64), pooled (P, 64)) per prompt, ``prompt_ids`` (N,) indexes it; ``uncond`` is the
    empty prompt's pair, swapped in with probability ``dropout`` so classifier-free guidance works.
    """
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, steps, warmup=min(200, steps // 10), floor=0.1)
    transformer.train()
    bar = tqdm(range(steps), desc="denoiser", leave=False)
    for step in bar:
        idx = torch.randint(0, len(prompt_ids), (batch_size,), generator=gen)
        x0 = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(batch_size, generator=gen))  # logit-normal(0, 1)
        sigma = shift * u / (1 + (shift - 1) * u)  # FlowMatchEulerDiscreteScheduler's shift
        s = sigma[:, None, None, None]
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled = cond[0][prompt_ids[idx]], cond[1][prompt_ids[idx]]
        drop = torch.rand(batch_size, generator=gen) < dropout
        embeds = torch.where(drop[:, None, None], uncond[0], embeds)
        pooled = torch.where(drop[:, None], uncond[1], pooled)
        pred = transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)  # velocity target of rectified flow
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights are forgotten quickly
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def _classifier_job(path: str, seed: int, steps: int, threads: int, parent: int) -> None:
    """Child process: train the classifier and save it with its accuracy (runs beside the VAE / denoiser)."""
    from ...lifeline import die_with_parent

    die_with_parent(parent)  # a killed build leaves no orphan training on
    torch.set_num_threads(threads)
    model, accuracy = train_classifier(seed=seed, steps=steps)
    save_classifier(model, Path(path))
    Path(path).with_suffix(".json").write_text(json.dumps(accuracy))


def build_world(output: Path, *, seed: int = 0, vae_steps: int = 1200, denoiser_steps: int = 4000,
                classifier_steps: int = 800, width: int = 128, layers: int = 4, batch_size: int = 64,
                lr: float = 1e-3, threads: int = 1, samples_per_pair: int = 4, save_dtype: str = "float32",
                command: str = "") -> dict:
    """Build the whole world into ``output`` (must not exist or be empty); return the ``world.json`` record.

    ``save_dtype`` ``float16`` stores the transformer's weights in half precision (half the file; loaders upcast to
    their own dtype); training and the measured accuracies below always use the reloaded, stored weights.
    """
    from diffusers import StableDiffusion3Pipeline

    output = Path(output).expanduser().absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output: {output} exists and is not an empty folder; choose a new one")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    torch.set_num_threads(threads)
    timings, start = {}, time.perf_counter()
    try:
        ctx = multiprocessing.get_context("spawn")
        job = ctx.Process(target=_classifier_job, args=(str(tmp / CLASSIFIER_FILE), seed, classifier_steps, threads,
                                                           os.getpid()))
        job.start()

        # ---- VAE on every pair (a generic image codec, like a real VAE: it must be able to draw the new shape
        # and style; only the denoiser is kept from them) --------------------------------------------------
        t = time.perf_counter()
        all_pairs = data.balanced_pairs(data.SHAPES, data.STYLES, 100)
        vae_images = data.to_tensor(data.render_set(all_pairs, base_seed=seed + 2_000_000))
        torch.manual_seed(seed)
        vae = make_vae(seed)
        psnr = train_vae(vae, vae_images, vae_steps, VAE_BATCH, seed)
        trained_pairs = [pair for _ in range(300) for pair in data.TRAINED_PAIRS]  # (N, 2), held-out pairs excluded
        images = data.to_tensor(data.render_set(trained_pairs, base_seed=seed + 3_000_000))
        with torch.no_grad():
            dists = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
        mean = torch.cat([d.mean for d in dists])
        std = torch.cat([d.std for d in dists])
        shift_factor = mean.mean().item()
        scaling_factor = 1.0 / (mean.var() + std.pow(2).mean()).sqrt().item()  # sampled latents' std -> 1
        vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
        timings["vae_s"] = round(time.perf_counter() - t, 1)

        # ---- text side and conditioning table ----------------------------------------------------------
        text = make_text_pipeline(seed)
        scheduler = flow_match_scheduler(dynamic_shifting=False)
        text_pipe = StableDiffusion3Pipeline(transformer=None, vae=None, scheduler=scheduler, **text)
        prompts = [data.caption(shape, style) for shape, style in data.TRAINED_PAIRS]
        cond = encode(text_pipe, prompts)
        uncond = tuple(x[0] for x in encode(text_pipe, [""]))
        prompt_ids = torch.tensor([prompts.index(data.caption(*p)) for p in trained_pairs])

        # ---- denoiser ------------------------------------------------------------------------------------
        t = time.perf_counter()
        transformer = make_transformer(seed, width, layers)
        latents_mean = (mean - shift_factor) * scaling_factor
        latents_std = std * scaling_factor
        ema = train_denoiser(transformer, latents_mean, latents_std, prompt_ids, cond, uncond, steps=denoiser_steps,
                             batch_size=batch_size, lr=lr, seed=seed, shift=scheduler.config.shift)
        timings["denoiser_s"] = round(time.perf_counter() - t, 1)

        ema.to(getattr(torch, save_dtype))  # stored precision; the evaluation below reloads what was stored
        pipe = StableDiffusion3Pipeline(transformer=ema, vae=vae, scheduler=scheduler, **text)
        with no_progress_bars():
            pipe.save_pretrained(tmp, safe_serialization=True)

        job.join()
        if job.exitcode != 0:
            raise RuntimeError(f"classifier training failed (exit code {job.exitcode})")
        classifier_accuracy = json.loads((tmp / CLASSIFIER_FILE).with_suffix(".json").read_text())
        (tmp / CLASSIFIER_FILE).with_suffix(".json").unlink()

        # ---- score the reloaded pipeline on every seen pair ---------------------------------------------
        t = time.perf_counter()
        torch.set_num_threads(max(threads, 2))  # the classifier's process has ended: sampling may use both cores
        reloaded = StableDiffusion3Pipeline.from_pretrained(tmp, torch_dtype=torch.float32)
        reloaded.set_progress_bar_config(disable=True)
        # Every seen (shape, style) pair, trained ones and held-out combinations, samples_per_pair seeds each.
        eval_pairs = data.balanced_pairs(data.SEEN_SHAPES, data.SEEN_STYLES, samples_per_pair)
        eval_seeds = list(range(len(eval_pairs)))
        generated = sample_images(reloaded, [data.caption(*p) for p in eval_pairs], eval_seeds, MAX_SEQUENCE_LENGTH,
                                  steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE)
        shapes, styles = predict(load_classifier(tmp / CLASSIFIER_FILE), generated)

        def accuracy(names, index, keep):
            return float(np.mean([a == p[index] for a, p in zip(names, eval_pairs) if keep(p)]))

        trained, combined = (lambda p: p in data.TRAINED_PAIRS), (lambda p: p in data.HELD_OUT_PAIRS)
        base = {
            "seen_shape_accuracy": accuracy(shapes, 0, trained), "seen_style_accuracy": accuracy(styles, 1, trained),
            "samples": sum(map(trained, eval_pairs)),
            "held_out_pair_shape_accuracy": accuracy(shapes, 0, combined),
            "held_out_pair_style_accuracy": accuracy(styles, 1, combined),
            "held_out_pair_samples": sum(map(combined, eval_pairs)),
            "sample_steps": SAMPLE_STEPS, "guidance_scale": SAMPLE_GUIDANCE,
        }
        _save_grid(generated, len(data.SEEN_SHAPES) * len(data.SEEN_STYLES), tmp / "samples.png")
        timings["evaluation_s"] = round(time.perf_counter() - t, 1)
        timings["total_s"] = round(time.perf_counter() - start, 1)

        record = {
            "format": "qrlora-world", "version": 1, "seed": seed, "command": command,
            "image_size": data.IMAGE_SIZE, "shapes": list(data.SHAPES), "styles": list(data.STYLES),
            "held_out_shape": data.HELD_OUT_SHAPE, "held_out_style": data.HELD_OUT_STYLE,
            "held_out_pairs": [list(p) for p in data.HELD_OUT_PAIRS],
            "caption": data.caption("{shape}", "{style}"), "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "settings": {"vae_steps": vae_steps, "denoiser_steps": denoiser_steps, "classifier_steps": classifier_steps,
                         "width": width, "layers": layers, "batch_size": batch_size, "lr": lr, "threads": threads,
                         "save_dtype": save_dtype},
            "rank_targets": {"flux_ratio": flux_ratio_rank(width), "flux_ratio_of": f"{FLUX_RANK} / {FLUX_WIDTH}"},
            "vae_psnr_db": round(psnr, 2), "classifier": classifier_accuracy, "base_model": base,
            "parameters": {"transformer": sum(p.numel() for p in ema.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())},
            "timings": timings, "torch": torch.__version__, "python": sys.version.split()[0],
        }
        (tmp / WORLD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(record))
        if output.is_dir():
            output.rmdir()
        os.rename(tmp, output)
        return record
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_grid(images: np.ndarray, per_row: int, path: Path) -> None:
    """A PNG of (N, 32, 32, 3) images, ``per_row`` to a row, scaled 2x (nearest) to be readable."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / per_row)
    grid = np.full((rows * h, per_row * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        grid[(i // per_row) * h:(i // per_row + 1) * h, (i % per_row) * w:(i % per_row + 1) * w] = im
    Image.fromarray(grid).resize((per_row * w * 2, rows * h * 2), Image.NEAREST).save(path)


def readme(record: dict) -> str:
    """The README written beside a built world: provenance, the command, the measured numbers."""
    c, b, s = record["classifier"], record["base_model"], record["settings"]
    return f"""# The CPU world (built by `qrlora.world build`)

A small text-to-image world where content and style are known by construction: 32 px images of a shape
({", ".join(record["shapes"])}) filled in a style ({", ".join(record["styles"])}), caption
`{record["caption"]}`. The shape **{record["held_out_shape"]}** and the style **{record["held_out_style"]}** never reached the
denoiser's training: they are the new content and the new style that adapters learn. The combinations
{", ".join(f"{a} in {b} style" for a, b in record["held_out_pairs"])} of seen words were left out too, to measure composition.

* `model_index.json`, `transformer/`, `vae/`, `text_encoder*/`, `tokenizer*/`, `scheduler/`: a standard
  `StableDiffusion3Pipeline` folder, trained from scratch on CPU (the text encoders are frozen random tiny ones
  from `qrlora.toy.tiny`, tokenizers learned from the world's captions). Tools need `--max_sequence_length {record["max_sequence_length"]}`
  (the T5 length it was trained with) and `--resolution {record["image_size"]}`.
* `classifier.safetensors`: the evaluator (shape head, style head, every shape and style).
* `world.json`: the spec, settings, measured numbers and timings below, machine readable.
* `samples.png`: the base model's evaluation samples, one row per seed, one column per seen (shape, style) pair.

Built with (seed {record["seed"]}, torch {record["torch"]}, {s["threads"]} torch thread(s) per process):

```bash
{record["command"]}
```

| measured | value |
|---|---|
| build wall time | {record["timings"]["total_s"] / 60:.1f} min (VAE {record["timings"]["vae_s"] / 60:.1f}, denoiser {record["timings"]["denoiser_s"] / 60:.1f}, evaluation {record["timings"]["evaluation_s"] / 60:.1f}; classifier in parallel) |
| VAE reconstruction | {record["vae_psnr_db"]:.1f} dB PSNR (256 held-out renders) |
| classifier on clean renders | shape {c["shape_accuracy"]:.1%}, style {c["style_accuracy"]:.1%} ({c["test_images"]} renders from unseen seeds, every shape and style) |
| base model, trained pairs | shape {b["seen_shape_accuracy"]:.1%}, style {b["seen_style_accuracy"]:.1%} ({b["samples"]} samples through the reloaded pipeline, {b["sample_steps"]} steps, guidance {b["guidance_scale"]}) |
| base model, held-out combinations of seen words ({", ".join(f"{a} in {b_}" for a, b_ in record["held_out_pairs"])}) | shape {b["held_out_pair_shape_accuracy"]:.1%}, style {b["held_out_pair_style_accuracy"]:.1%} ({b["held_out_pair_samples"]} samples) |
| parameters | transformer {record["parameters"]["transformer"]:,} (width {s["width"]}, {s["layers"]} blocks, stored as {s.get("save_dtype", "float32")}), VAE {record["parameters"]["vae"]:,} |
| adapter rank with FLUX.1-dev's r / width ({record.get("rank_targets", {}).get("flux_ratio_of", "64 / 3072")}) | {record.get("rank_targets", {}).get("flux_ratio", "-")} |
"""
