"""Stable Diffusion XL: ``UNet2DConditionModel``, two CLIP encoders (+ pooled), micro-conditioning, DDPM noise.

The objective is the one SDXL was trained with (Podell et al., 2023) and diffusers'
``train_dreambooth_lora_sdxl.py`` uses: DDPM noise at a uniform integer ``t``, target epsilon or v as the
scheduler config says, optionally min-SNR weighted (``qrlora.core.objective``). EDM-parametrised checkpoints
(Playground v2.5: an ``EDM*`` scheduler) are refused: their noise is not DDPM's, and reading their config as DDPM
would silently train with linear betas.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import DDPMScheduler

from ..errors import UserError
from ..core.objective import Objective
from .base import Backbone


class SDXL(Backbone):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    default_model = "stabilityai/stable-diffusion-xl-base-1.0"
    # The published denoiser's config.json (default_model's denoiser folder): full-size checks and benches build
    # it on the meta device (Backbone.meta_denoiser), no download.
    published_config = {
        "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
        "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    }
    default_resolution = 1024  # the training default (TrainSettings.for_backbone)
    run_root = "exps_SDXL"
    default_inference_steps = 30  # the published SDXL inference script's
    # The four attention projections of self- (attn1) and cross-attention (attn2) in every transformer block of
    # the UNet: diffusers' SDXL DreamBooth LoRA set (to_q, to_k, to_v, to_out.0), spelled with the attn1/attn2
    # parent so nothing outside BasicTransformerBlock attention can match (not proj_in/out, ff, time embeddings).
    default_targets = (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    )
    default_objective = Objective(prediction_type="epsilon")  # the scheduler config's prediction_type wins
    default_max_sequence_length = 77  # CLIP context; SDXL has no T5
    block_stages = (("down_blocks", "down", "D"), ("mid_block", "mid", "M"), ("up_blocks", "up", "U"))  # the UNet
    vae_in_float32 = True  # SDXL's original VAE overflows in fp16 (diffusers' scripts keep it in float32)
    text_encoder_names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def shard_units(self, denoiser):
        """The UNet's down, mid and up blocks (it has no list of uniform transformer blocks)."""
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]

    # ---- prompts and latents --------------------------------------------------------------------------
    def encode_prompts(self, text_pipeline, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, do_classifier_free_guidance=False,
        )
        # (P, 77, D1 + D2): penultimate hidden states of both CLIPs concatenated; (P, proj): CLIP-G text_embeds
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def negative_cond(self, text_pipeline, device, max_sequence_length):
        """Zeros when the pipeline says ``force_zeros_for_empty_prompt`` (SDXL base does), as its ``__call__`` does."""
        empty = self.encode_prompts(text_pipeline, [""], device, max_sequence_length)
        if getattr(text_pipeline.config, "force_zeros_for_empty_prompt", False):
            return {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def batch_cond(self, table, batch):
        """Prompt rows plus each image's micro-conditioning ``time_ids`` (B, 6): original size (h, w), crop
        top-left (y, x) and target size (h, w), as diffusers' SDXL DreamBooth script records them per image."""
        cond = super().batch_cond(table, batch)
        parts = (batch["original_size"], batch["crop_top_left"], batch["target_size"])  # each (B, 2)
        embeds = cond["prompt_embeds"]
        cond["time_ids"] = torch.cat(parts, dim=1).to(embeds.device, embeds.dtype)
        return cond

    def pipeline_prompt_kwargs(self, positive, negative):
        return {
            "prompt_embeds": positive["prompt_embeds"],
            "pooled_prompt_embeds": positive["pooled_prompt_embeds"],
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        }

    def normalize_latents(self, vae_config, raw):
        """``x_0 = z * scaling_factor`` (0.13025 for SDXL's VAE, no shift), or ``(z - mean) * scaling / std``
        for VAEs whose config carries ``latents_mean`` / ``latents_std`` (the SDXL pipeline decodes with both)."""
        mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
        if mean is None or std is None:
            return raw * vae_config.scaling_factor
        mean = torch.tensor(mean, device=raw.device, dtype=raw.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=raw.device, dtype=raw.dtype).view(1, -1, 1, 1)
        return (raw - mean) * vae_config.scaling_factor / std

    # ---- objective ------------------------------------------------------------------------------------
    @staticmethod
    def _refuse_edm(scheduler) -> None:
        class_name = scheduler.config.get("_class_name", type(scheduler).__name__)
        if "EDM" in class_name or "EDM" in type(scheduler).__name__:
            raise UserError(f"scheduler/scheduler_config.json: {class_name} is an EDM schedule (e.g. Playground "
                            "v2.5); SDXL training here supports DDPM epsilon / v-prediction checkpoints only")

    def objective(self, scheduler, **overrides) -> Objective:
        """DDPM objective with the scheduler config's ``prediction_type`` (epsilon or v_prediction)."""
        self._refuse_edm(scheduler)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"scheduler/scheduler_config.json: prediction_type '{prediction_type}' is not supported "
                            "for SDXL training (use one of epsilon, v_prediction)")
        return replace(super().objective(scheduler, **overrides), prediction_type=prediction_type)

    def noise_schedule(self, scheduler):
        """DDPM ``alphas_cumprod`` from the (Euler) inference scheduler's betas: its DDPM twin, built once."""
        self._refuse_edm(scheduler)
        return super().noise_schedule(DDPMScheduler.from_config(scheduler.config))

    def predict(self, denoiser, noisy, timesteps, cond, objective) -> torch.Tensor:
        """The UNet's output (epsilon or v), same shape as ``noisy`` (B, 4, h, w)."""
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(noisy, timesteps, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=added,
                        return_dict=False)[0]

    def tiny_pipeline(self, seed: int, parts):
        """The offline tiny SDXL pipeline (``python -m qrlora.tiny``; ``parts``: ``qrlora.toy.tiny``'s builders).

        The UNet has the shapes of diffusers' own SDXL tests: latent [B, 4, 8, 8], channels (32, 64); attention lives
        only at the 64-channel level (down_blocks.1, mid_block, up_blocks.0), ``attention_head_dim`` is really the
        head count there: 4 heads of 16. The scheduler is the one shipped with stable-diffusion-xl-base-1.0.
        """
        import diffusers

        time_embed_dim = 8
        text_width, pooled_dim = 2 * parts.CLIP_WIDTH, parts.CLIP_WIDTH  # concat of both CLIP hidden states; pooled
        clip_tok, clip_tok_2 = parts.build_clip_tokenizer(), parts.build_clip_tokenizer()
        with parts.seeded(seed, "unet"):
            unet = diffusers.UNet2DConditionModel(
                sample_size=8,  # latent side -> default image side 64
                in_channels=4,
                out_channels=4,
                block_out_channels=(32, 64),
                layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                transformer_layers_per_block=1,
                use_linear_projection=True,
                cross_attention_dim=text_width,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                # 6 micro-conditioning ints (orig size, crop, target size) x 8 + pooled text_embeds
                projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
            ).eval()
        scheduler = diffusers.EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading", steps_offset=1,
            use_karras_sigmas=False,
        )
        return diffusers.StableDiffusionXLPipeline(
            unet=unet,
            scheduler=scheduler,
            vae=parts.build_vae(seed, 4, flow_style=False, scaling_factor=0.13025),
            text_encoder=parts.build_clip_text_encoder(clip_tok, seed, "text_encoder", with_projection=False),
            tokenizer=clip_tok,
            text_encoder_2=parts.build_clip_text_encoder(clip_tok_2, seed, "text_encoder_2", with_projection=True),
            tokenizer_2=clip_tok_2,
            force_zeros_for_empty_prompt=True,  # SDXL base default, written to model_index.json
            add_watermarker=False,  # the invisible-watermark package is not needed
        )
