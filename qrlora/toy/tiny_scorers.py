"""Offline tiny random CLIP and DINO models for the evaluation tests and the comparison demo.

``qrlora.evaluation.evaluate`` scores images with ``openai/clip-vit-large-patch14`` and ``facebook/dino-vits16`` by default;
tests cannot download them. These writers build the same transformers classes (``CLIPModel`` with its
``CLIPImageProcessor`` and CLIP tokenizer; ``ViTModel`` with its ``ViTImageProcessor``, the architecture of
DINO ViT-S/16) at toy widths from a seed, and save them with ``save_pretrained``, so evaluation loads them
exactly as it loads a hub model. Their scores are meaningless numbers; only the machinery is real.

CLI (``qrlora.cli.tiny_scorers``)::

    python -m qrlora.tiny_scorers --output DIR [--seed 0]      # writes DIR/clip and DIR/dino
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from .tiny import CLIP_MAX_LENGTH, build_clip_tokenizer, seeded

IMAGE_SIZE = 32  # input resolution of both tiny towers (patch 8 -> 16 patches + CLS)
WIDTH = 32


def build_tiny_clip(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``CLIPModel`` (text + vision towers, projection 16) with its image processor and tokenizer."""
    tokenizer = build_clip_tokenizer()
    common = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4)
    text = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **common)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, **common)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    with seeded(seed, "eval_clip"):
        model = CLIPModel(config).eval()
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def build_tiny_dino(output_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``ViTModel`` (DINO ViT-S/16's class, no pooler) with its ``ViTImageProcessor``."""
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                       num_hidden_layers=2, num_attention_heads=4)
    with seeded(seed, "eval_dino"):
        model = ViTModel(config, add_pooling_layer=False).eval()
    out = Path(output_dir)
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def build_tiny_scorers(output_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """``(DIR/clip, DIR/dino)``, reused when already written."""
    root = Path(output_dir)
    clip, dino = root / "clip", root / "dino"
    if not (clip / "config.json").is_file():
        build_tiny_clip(clip, seed)
    if not (dino / "config.json").is_file():
        build_tiny_dino(dino, seed)
    return clip, dino
