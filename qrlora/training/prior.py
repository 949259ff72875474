"""Prior preservation (Ruiz et al., 2023, DreamBooth): class images generated with the base pipeline where missing."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers.training_utils import free_memory
from tqdm.auto import tqdm

from .data import IMAGE_EXTENSIONS


def generate_class_images(backbone, settings, device, dtype) -> int:
    """Fill ``settings.class_data_dir`` up to ``settings.num_class_images`` with images of ``settings.class_prompt``.

    Returns the number of images generated (0 when the folder already holds enough).
    """
    folder = Path(settings.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    missing = settings.num_class_images - have
    if missing <= 0:
        return 0
    denoiser = backbone.load_denoiser(settings.pretrained_model_name_or_path, dtype)
    pipe = backbone.inference_pipeline(settings.pretrained_model_name_or_path, denoiser, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    for i in tqdm(range(missing), desc="class images"):
        image = pipe(prompt=settings.class_prompt, height=settings.resolution, width=settings.resolution,
                     num_inference_steps=settings.validation_inference_steps, generator=generator).images[0]
        digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
        image.save(folder / f"{have + i:05d}-{digest}.png")
    del pipe, denoiser
    free_memory()
    return missing
