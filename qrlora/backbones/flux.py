"""FLUX.1 (double- and single-stream MMDiT): packed 2x2 latents, image/text position ids, guidance embedding."""
from __future__ import annotations

import torch

from ..core.objective import Objective
from .base import FlowMatchingBackbone, OriginalModule


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents``: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class Flux(FlowMatchingBackbone):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    default_model = "black-forest-labs/FLUX.1-dev"
    # FLUX.1-dev is guidance-distilled: it trains with its guidance embedding at 3.5, as diffusers' FLUX DreamBooth
    # script does (at 1.0 it would learn at a guidance it never renders with).
    default_objective = Objective(prediction_type="flow", guidance_scale=3.5)
    # The published denoiser's config.json (default_model's denoiser folder): full-size checks and benches build
    # it on the meta device (Backbone.meta_denoiser), no download.
    published_config = {
        "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
        "patch_size": 1, "pooled_projection_dim": 768,
    }
    default_resolution = 512  # the training default (TrainSettings.for_backbone)
    run_root = "exps_flux"
    run_name_has_method = False  # the published FLUX scripts name runs <date-time>-<trigger>-<rank>
    # As published for FLUX: attention and feed-forward of both streams; names match in double and single blocks.
    default_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    default_max_sequence_length = 512
    block_lists = (("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers"))  # double first
    block_stages = (("transformer_blocks", "joint", "J"), ("single_transformer_blocks", "single", "S"))
    text_encoder_names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    # BFL's checkpoint names (kohya sd-scripts, ComfyUI, A1111/Forge); q, k, v (and, in single blocks, the MLP
    # input) are one fused Linear there. The same map as diffusers' ``_convert_kohya_flux_lora_to_diffusers``.
    original_layout = (
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.img_attn.proj", ("attn.to_out.0",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.txt_attn.proj", ("attn.to_add_out",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.img_mlp.0", ("ff.net.0.proj",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.img_mlp.2", ("ff.net.2",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.txt_mlp.0", ("ff_context.net.0.proj",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.txt_mlp.2", ("ff_context.net.2",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.img_mod.lin", ("norm1.linear",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "double_blocks.{0}.txt_mod.lin", ("norm1_context.linear",)),
        # linear1 rows: q, k, v (inner dim each), then the MLP input (4x inner dim, FLUX's mlp_ratio).
        OriginalModule(r"single_transformer_blocks\.(\d+)", "single_blocks.{0}.linear1",
                       ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), rows=(1, 1, 1, 4)),
        OriginalModule(r"single_transformer_blocks\.(\d+)", "single_blocks.{0}.linear2", ("proj_out",)),
        OriginalModule(r"single_transformer_blocks\.(\d+)", "single_blocks.{0}.modulation.lin", ("norm.linear",)),
    )

    def encode_prompts(self, text_pipeline, prompts, device, max_sequence_length):
        embeds, pooled, text_ids = text_pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}  # text_ids (L, 3)

    def batch_cond(self, table, batch):
        ids = batch["prompt_ids"]
        return {k: (v if k == "text_ids" else v[ids.to(v.device)]) for k, v in table.items()}  # text_ids: shared

    def pipeline_prompt_kwargs(self, positive, negative):
        return {"prompt_embeds": positive["prompt_embeds"], "pooled_prompt_embeds": positive["pooled_prompt_embeds"]}

    def predict(self, denoiser, noisy, timesteps, cond, objective):
        b, _, h, w = noisy.shape
        config = getattr(denoiser, "module", denoiser).config
        guidance = torch.full((b,), float(objective.guidance_scale), device=noisy.device) if config.guidance_embeds else None
        tokens = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps / 1000,  # FLUX embeds t in [0, 1]
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=image_ids(h, w, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(tokens, h, w)

    def tiny_pipeline(self, seed: int, parts):
        """The offline tiny FLUX pipeline (``python -m qrlora.tiny``; ``parts``: ``qrlora.toy.tiny``'s builders).

        1 double + 1 single block, 2 heads x 16 = inner width 32; packed latent tokens of 64.
        """
        import diffusers

        t5_width = 32
        clip_tok, t5_tok = parts.build_clip_tokenizer(), parts.build_t5_tokenizer()
        with parts.seeded(seed, "transformer"):
            transformer = diffusers.FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,  # 16 latent channels x 2x2 packing
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=t5_width,  # T5 width
                pooled_projection_dim=parts.CLIP_WIDTH,  # CLIP pooler_output width
                guidance_embeds=True,  # like FLUX.1-dev
                axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
            ).eval()
        return diffusers.FluxPipeline(
            transformer=transformer,
            scheduler=parts.flow_match_scheduler(dynamic_shifting=True),
            vae=parts.build_vae(seed, 16, flow_style=True, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=parts.build_clip_text_encoder(clip_tok, seed, "text_encoder", with_projection=False),
            tokenizer=clip_tok,
            text_encoder_2=parts.build_t5_encoder(t5_tok, seed, "text_encoder_2", d_model=t5_width),
            tokenizer_2=t5_tok,
        )
