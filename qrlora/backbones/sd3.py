"""Stable Diffusion 3 (MMDiT): ``SD3Transformer2DModel``, two CLIP encoders + T5, flow matching."""
from __future__ import annotations

from ..core.objective import Objective
from .base import FlowMatchingBackbone, OriginalModule


class SD3(FlowMatchingBackbone):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    default_model = "stabilityai/stable-diffusion-3-medium-diffusers"
    # The published denoiser's config.json (default_model's denoiser folder): full-size checks and benches build
    # it on the meta device (Backbone.meta_denoiser), no download.
    published_config = {
        "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "sample_size": 128,
    }
    default_resolution = 512  # the training default (TrainSettings.for_backbone)
    run_root = "exps_SD3"
    # The eight attention projections of every joint block (image and context streams), as published.
    default_targets = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    )
    # diffusers' SD3 DreamBooth script: logit-normal timesteps, x0-preconditioned outputs, VAE in float32.
    default_objective = Objective(prediction_type="flow", weighting_scheme="logit_normal", precondition_outputs=True)
    default_max_sequence_length = 77
    block_lists = (("transformer_blocks", "num_layers"),)
    block_stages = (("transformer_blocks", "joint", "J"),)  # MMDiT blocks
    vae_in_float32 = True
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    # Stability's MMDiT checkpoint names (kohya sd-scripts, ComfyUI); q, k, v are one fused Linear there, in that
    # row order (diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` splits them the same way).
    original_layout = (
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.x_block.attn.proj", ("attn.to_out.0",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.context_block.attn.qkv",
                       ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.context_block.attn.proj", ("attn.to_add_out",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.x_block.mlp.fc1", ("ff.net.0.proj",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.x_block.mlp.fc2", ("ff.net.2",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.context_block.mlp.fc1", ("ff_context.net.0.proj",)),
        OriginalModule(r"transformer_blocks\.(\d+)", "joint_blocks.{0}.context_block.mlp.fc2", ("ff_context.net.2",)),
    )

    def encode_prompts(self, text_pipeline, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (P, L, D), (P, 2 * proj)

    def pipeline_prompt_kwargs(self, positive, negative):
        return {
            "prompt_embeds": positive["prompt_embeds"],
            "pooled_prompt_embeds": positive["pooled_prompt_embeds"],
            "negative_prompt_embeds": negative["prompt_embeds"],
            "negative_pooled_prompt_embeds": negative["pooled_prompt_embeds"],
        }

    def predict(self, denoiser, noisy, timesteps, cond, objective):
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
            pooled_projections=cond["pooled_prompt_embeds"], return_dict=False,
        )[0]

    def tiny_pipeline(self, seed: int, parts):
        """The offline tiny SD3 pipeline (``python -m qrlora.tiny``). ``parts`` are ``qrlora.toy.tiny``'s seeded
        builders (tokenizers, text encoders, VAE, scheduler), handed in so the registry imports nothing above it.

        Tiny MMDiT: 2 joint blocks, 4 heads x 8 = inner width 32; latent [B, 16, 8, 8] -> 4x4 patches of 2.
        """
        import diffusers

        t5_width = 2 * parts.CLIP_WIDTH  # must be >= concat of the two CLIP widths (SD3 pads CLIP up to T5)
        clip_tok, clip_tok_2, t5_tok = parts.build_clip_tokenizer(), parts.build_clip_tokenizer(), parts.build_t5_tokenizer()
        with parts.seeded(seed, "transformer"):
            transformer = diffusers.SD3Transformer2DModel(
                sample_size=8,  # latent side -> default image side 64
                patch_size=2,
                in_channels=16,
                out_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=t5_width,  # T5 width (CLIP states are zero-padded up to it)
                caption_projection_dim=32,  # = inner width
                pooled_projection_dim=2 * parts.CLIP_WIDTH,  # concat of both CLIP text_embeds
                pos_embed_max_size=16,
            ).eval()
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=parts.flow_match_scheduler(dynamic_shifting=False),
            vae=parts.build_vae(seed, 16, flow_style=True, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=parts.build_clip_text_encoder(clip_tok, seed, "text_encoder", with_projection=True),
            tokenizer=clip_tok,
            text_encoder_2=parts.build_clip_text_encoder(clip_tok_2, seed, "text_encoder_2", with_projection=True),
            tokenizer_2=clip_tok_2,
            text_encoder_3=parts.build_t5_encoder(t5_tok, seed, "text_encoder_3", d_model=t5_width),
            tokenizer_3=t5_tok,
        )
