"""DreamBooth data: instance (and optional class) images, preprocessed once with PIL, plus their prompt ids.

Preprocessing (resize, crop, flip) is decided once when the dataset is built, from a seeded generator, as the
diffusers SD3/FLUX DreamBooth scripts do (each ``--repeats`` copy transformed on its own): the data a step sees
then depends only on the sampler order, so a run resumed from a checkpoint continues bit-identically.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | Path, flag: str, resolution: int | None = None) -> list[Image.Image]:
    """Readable RGB images of ``folder`` in name order; unreadable files are skipped with one warning.

    With ``resolution``, large images are shrunk while loading (``load_image``) so a folder of 10000 x 10000
    photos never needs gigabytes at once. Images beyond PIL's decompression-bomb limit are skipped like
    unreadable files.

    Raises:
        UserError: naming ``flag`` when the folder is missing, empty, or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag}: folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{flag}: folder {folder} is empty")
    images, unreadable = [], []
    for path in files:
        try:
            images.append(load_image(path, resolution))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            unreadable.append(path.name)
    if unreadable:
        warnings.warn(f"{flag}: skipped {len(unreadable)} unreadable file(s) in {folder}: {', '.join(unreadable)}", stacklevel=2)
    if not images:
        raise UserError(f"{flag}: folder {folder} holds no readable image")
    return images


def load_image(path: str | Path, resolution: int | None = None) -> Image.Image:
    """One image as 8-bit RGB, EXIF orientation applied; shrunk while loading when far above ``resolution``.

    Shrinking keeps the short side at least ``max(2 * resolution, 1024)`` (JPEG decodes at a reduced DCT scale
    via ``draft``, others by an integer box ``reduce``), so the bicubic resize to ``resolution`` that follows
    sees the same detail. 16-bit and 32-bit integer images are scaled to 8 bits (a plain ``convert`` clips them
    to white); transparent pixels are composited onto white.
    """
    with Image.open(path) as img:
        # The true source size (h, w) after EXIF rotation, before any shrinking: SDXL is conditioned on it.
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # orientations that swap width and height
            width, height = height, width
        floor = max(2 * resolution, 1024) if resolution else None
        if floor and min(img.size) >= 2 * floor:
            img.draft("RGB", (img.size[0] * floor // min(img.size), img.size[1] * floor // min(img.size)))
        image = ImageOps.exif_transpose(img)
        image = _to_8bit(image)
        if floor and min(image.size) >= 2 * floor:
            image = image.reduce(min(image.size) // floor)
        image = on_white(image)
        image.info["original_size"] = (height, width)
        return image


def on_white(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (RGBA, LA, a palette's transparent index) composited onto white: a plain
    ``convert("RGB")`` keeps whatever colour a transparent pixel stores (often black)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` (16 or 32-bit integer grey) -> ``L`` scaled by the 16-bit range; other modes as they are."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image).astype(np.float64)
    full = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(values * (255.0 / full)), 0, 255).astype(np.uint8))


def to_training_tensor(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random) -> TrainingImage:
    """Resize the short side to ``resolution``, crop a square (center or seeded random), optionally mirror.

    Returns the (3, resolution, resolution) float tensor in [-1, 1] with SDXL's micro-conditioning facts: the
    source size (h, w) before resizing and the crop's top-left (y, x) in the resized image, as diffusers' SDXL
    DreamBooth script records them.
    """
    original_size = image.info.get("original_size", (image.height, image.width))
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return TrainingImage(pixels, original_size, (top, left), (resolution, resolution))


@dataclass
class TrainingImage:
    """One preprocessed image: ``pixels`` (3, H, W) in [-1, 1], or after caching ``latent_params`` (2C, h, w),
    the VAE's latent distribution (mean and log-variance, sampled afresh every step); sizes as (h, w) pairs."""

    pixels: torch.Tensor | None
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    latent_params: torch.Tensor | None = None


class DreamBoothDataset(Dataset):
    """Instance images with prompt id 0, repeated ``repeats`` times; class images (prior preservation) with id 1.

    Every repeat of an image gets its own crop and flip (drawn from the seeded generator), as the diffusers
    scripts transform each repeated copy. Items are dicts of ``TrainingImage`` and prompt ids.
    """

    def __init__(self, instance_dir, *, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 repeats: int = 1, class_dir=None, num_class_images: int = 0, seed: int = 0):
        rng = random.Random(seed)

        def prepare(images):
            return [to_training_tensor(img, resolution, center_crop, random_flip and rng.random() < 0.5, rng) for img in images]

        self.instance = prepare(list_images(instance_dir, "--instance_data_dir", resolution) * max(1, repeats))
        self.klass = []
        if class_dir is not None:
            self.klass = prepare(list_images(class_dir, "--class_data_dir", resolution)[: num_class_images or None])

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass))

    def __getitem__(self, index: int) -> dict:
        item = {"instance": self.instance[index % len(self.instance)], "prompt_id": 0}
        if self.klass:
            item["class"] = self.klass[index % len(self.klass)]
            item["class_prompt_id"] = 1
        return item

    @torch.no_grad()
    def cache(self, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every image's pixels by its latent distribution's parameters (``encode``: (1, 3, H, W) ->
        (1, 2C, h, w), mean and log-variance), computed once; each step then samples its own latent from it."""
        for image in self.instance + self.klass:
            image.latent_params = encode(image.pixels.unsqueeze(0))[0].cpu()
            image.pixels = None


def collate(examples: list[dict]) -> dict:
    """Stack a batch; with prior preservation the class half follows the instance half (as diffusers does).

    Returns ``pixels`` (B, 3, H, W) or ``latent_params`` (B, 2C, h, w), ``prompt_ids`` (B,), and
    ``original_size`` / ``crop_top_left`` / ``target_size`` (B, 2) for SDXL's micro-conditioning.
    """
    images = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    ids = [e["prompt_id"] for e in examples] + [e["class_prompt_id"] for e in examples if "class" in e]
    key = "latent_params" if images[0].latent_params is not None else "pixels"
    batch = {key: torch.stack([getattr(im, key) for im in images]), "prompt_ids": torch.tensor(ids, dtype=torch.long)}
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([getattr(im, name) for im in images], dtype=torch.long)
    return batch
