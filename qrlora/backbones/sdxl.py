"""Stable Diffusion XL: ``UNet2DConditionModel``, two CLIP encoders (+ pooled), micro-conditioning, DDPM noise.

The objective is the one SDXL was trained with (Podell et al., 2023) and diffusers'
``train_dreambooth_lora_sdxl.py`` uses: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e`` at a uniform integer ``t``,
target ``e`` (epsilon) or ``v = sqrt(a_t) e - sqrt(1 - a_t) x_0`` (v_prediction), as the scheduler config says,
optionally min-SNR weighted (Hang et al., 2023, ``--snr_gamma``).
"""
from __future__ import annotations

import weakref

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ..errors import UserError
from .base import Backbone

PREDICTION_TYPES = ("epsilon", "v_prediction")


class SDXL(Backbone):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    # The four attention projections of self- (attn1) and cross-attention (attn2) in every transformer block of
    # the UNet: diffusers' SDXL DreamBooth LoRA set (to_q, to_k, to_v, to_out.0), spelled with the attn1/attn2
    # parent so nothing outside BasicTransformerBlock attention can match (not proj_in/out, ff, time embeddings).
    default_targets = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    )
    default_weighting_scheme = "none"  # flow-matching only; SDXL uses --snr_gamma instead
    default_max_sequence_length = 77  # CLIP context; SDXL has no T5
    text_encoder_names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def __init__(self) -> None:
        # Training scheduler per pipeline scheduler: the DDPM twin of the (Euler) inference scheduler.
        self._ddpm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---- prompts and latents --------------------------------------------------------------------------
    def encode_prompts(self, text_pipeline, prompts, device, args):
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, do_classifier_free_guidance=False,
        )
        # (P, 77, D1 + D2): penultimate hidden states of both CLIPs concatenated; (P, proj): CLIP-G text_embeds
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pipeline_prompt_kwargs(self, positive, negative):
        return {
            "prompt_embeds": positive["prompt_embeds"],
            "pooled_prompt_embeds": positive["pooled_prompt_embeds"],
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        }

    def latents_from_pixels(self, vae, pixels):
        """``x_0 = z * scaling_factor`` (0.13025 for SDXL's VAE, no shift), or ``(z - mean) * scaling / std``
        for VAEs whose config carries ``latents_mean`` / ``latents_std`` (the SDXL pipeline decodes with both)."""
        cfg = vae.config
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return latents * cfg.scaling_factor
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) * cfg.scaling_factor / std

    # ---- objective ------------------------------------------------------------------------------------
    def training_scheduler(self, scheduler) -> DDPMScheduler:
        """The DDPM scheduler with ``scheduler``'s betas and ``prediction_type`` (built once per scheduler)."""
        if isinstance(scheduler, DDPMScheduler):
            return scheduler
        ddpm = self._ddpm.get(scheduler)
        if ddpm is None:
            ddpm = self._ddpm[scheduler] = DDPMScheduler.from_config(scheduler.config)
        return ddpm

    @staticmethod
    def add_time_ids(resolution: int, batch: int, device, dtype) -> torch.Tensor:
        """SDXL micro-conditioning (B, 6): original size, crop top-left, target size, each (height, width).

        The dataset resizes and crops every image to a ``resolution`` square, so we condition on "a
        resolution x resolution original, uncropped" -- what inference asks for by default -- rather than on
        the true source size and crop offset (which diffusers' SDXL scripts record per image).
        """
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
        return ids.expand(batch, 6)

    def predict(self, denoiser, noisy, timesteps, cond, args) -> torch.Tensor:
        """The UNet's output (epsilon or v), same shape as ``noisy`` (B, 4, h, w)."""
        embeds = cond["prompt_embeds"]
        added = {
            "text_embeds": cond["pooled_prompt_embeds"],
            "time_ids": self.add_time_ids(args.resolution, noisy.shape[0], noisy.device, embeds.dtype),
        }
        return denoiser(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def loss_per_sample(self, denoiser, latents, cond, scheduler, args):
        ddpm = self.training_scheduler(scheduler)
        prediction_type = ddpm.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"scheduler/scheduler_config.json: prediction_type '{prediction_type}' is not supported "
                            f"for SDXL training (use one of {', '.join(PREDICTION_TYPES)})")
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy = ddpm.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else ddpm.get_velocity(latents, noise, timesteps)
        pred = self.predict(denoiser, noisy, timesteps, cond, args)
        loss = ((pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)
        if args.snr_gamma is None:
            return loss
        # Min-SNR-gamma (Hang et al., 2023, s. 3.4) in the epsilon / v parametrisation, as diffusers' scripts:
        # min(snr, gamma) / snr for epsilon (written min(1, gamma / snr): 1, not 0/0, at zero terminal SNR)
        # and min(snr, gamma) / (snr + 1) for v.
        snr = compute_snr(ddpm, timesteps)
        if prediction_type == "epsilon":
            weights = (args.snr_gamma / snr).clamp(max=1.0)
        else:
            weights = snr.clamp(max=args.snr_gamma) / (snr + 1)
        return loss * weights
