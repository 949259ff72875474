"""Denoiser configs of the full-size models, as published in their ``config.json`` (no weights, no download).

Tests build these on the ``meta`` device to check key sets at the real sizes: FLUX.1-dev (342 default target
Linears), SD3-medium (190: the last block's discarded add_q_proj is no target), SDXL-base (560).
"""

FLUX_1_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
    "patch_size": 1, "pooled_projection_dim": 768,
}

SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192, "sample_size": 128,
}

SDXL_BASE = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
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

FULL_SIZE = {"flux": ("FluxTransformer2DModel", FLUX_1_DEV), "sd3": ("SD3Transformer2DModel", SD3_MEDIUM),
             "sdxl": ("UNet2DConditionModel", SDXL_BASE)}


def meta_denoiser(backbone: str):
    """The full-size denoiser of ``backbone`` on the meta device: real module tree and shapes, no memory."""
    import diffusers
    import torch

    cls_name, config = FULL_SIZE[backbone]
    with torch.device("meta"):
        return getattr(diffusers, cls_name).from_config(config)
