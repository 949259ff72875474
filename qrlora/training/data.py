"""DreamBooth data: instance (and optional class) images, preprocessed once with PIL, plus their prompt ids.

Preprocessing (resize, crop, flip) is decided once when the dataset is built, from a seeded generator, as the
diffusers SD3/FLUX DreamBooth scripts do (each ``--repeats`` copy transformed on its own): the data a step sees
then depends only on the sampler order, so a run resumed from a checkpoint continues bit-identically.
"""
from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..core.objective import step_generator
from .buckets import nearest_bucket
from ..errors import UserError
from .sources import IMAGE_EXTENSIONS, CaptionRules, Example, folder_examples, scan_folder

def list_images(folder: str | Path, flag: str, resolution: int | None = None) -> list[Image.Image]:
    """Readable RGB images of ``folder`` in name order (class images, evaluation folders); image files that do not
    open (beyond PIL's decompression-bomb limit included) and files that are not images are named in one warning.

    With ``resolution``, large images are shrunk while loading (``load_image``) so a folder of 10000 x 10000
    photos never needs gigabytes at once.

    Raises:
        UserError: naming ``flag`` when the folder is missing, empty, or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{flag}: folder {folder} does not exist")
    if not any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir()):
        raise UserError(f"{flag}: folder {folder} is empty")
    paths, _ = scan_folder(folder, flag, caption_extension=None)
    images = []
    for path in paths:
        try:
            images.append(load_image(path, resolution))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            warnings.warn(f"{flag}: skipped {path.name} in {folder}: its header opens but the image does not decode", stacklevel=2)
    if not images:
        raise UserError(f"{flag}: folder {folder} holds no readable image")
    return images


def load_image(path: str | Path | Image.Image, resolution: int | None = None) -> Image.Image:
    """One image as 8-bit RGB, EXIF orientation applied; shrunk while loading when far above ``resolution``.

    Shrinking keeps the short side at least ``max(2 * resolution, 1024)`` (JPEG decodes at a reduced DCT scale
    via ``draft``, others by an integer box ``reduce``), so the bicubic resize to ``resolution`` that follows
    sees the same detail. 16-bit and 32-bit integer images are scaled to 8 bits (a plain ``convert`` clips them
    to white); transparent pixels are composited onto white.
    """
    with (contextlib.nullcontext(path) if isinstance(path, Image.Image) else Image.open(path)) as img:
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


def to_training_tensor(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random,
                       size: tuple[int, int] | None = None) -> TrainingImage:
    """Resize to cover ``size`` (h, w; default the ``resolution`` square), crop it (center or seeded random; for
    a bucket of the image's aspect only the rounding is cropped), optionally mirror.

    Returns the (3, h, w) float tensor in [-1, 1] with SDXL's micro-conditioning facts: the source size (h, w)
    before resizing and the crop's top-left (y, x) in the resized image, as diffusers' SDXL DreamBooth script
    records them.
    """
    target_h, target_w = size or (resolution, resolution)
    original_size = image.info.get("original_size", (image.height, image.width))
    w, h = image.size
    scale = max(target_w / w, target_h / h)
    image = image.resize((max(target_w, round(w * scale)), max(target_h, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if center_crop:
        left, top = (w - target_w) // 2, (h - target_h) // 2
    else:
        left, top = rng.randint(0, w - target_w), rng.randint(0, h - target_h)
    image = image.crop((left, top, left + target_w, top + target_h))
    if flip:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return TrainingImage(pixels, original_size, (top, left), (target_h, target_w))


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
    """Instance images, each with its caption's prompt id and repeated ``repeats`` times (times the example's
    own repeats); class images (prior preservation) with the class prompt's id.

    ``instance``: the ``Example`` list of ``qrlora.training.sources``, or a folder (its sidecar captions, else
    ``instance_prompt``). ``prompts`` lists every distinct caption (first seen first), then the class prompt: prompt
    id i is ``prompts[i]``, the row of the encoded prompt table. Every repeat of an image gets its own crop and flip
    (drawn from the seeded generator), as the diffusers scripts transform each repeated copy. Items are dicts of
    ``TrainingImage`` and prompt ids.
    """

    def __init__(self, instance, *, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 repeats: int = 1, class_dir=None, num_class_images: int = 0, seed: int = 0,
                 instance_prompt: str | None = None, class_prompt: str | None = None,
                 buckets: list[tuple[int, int]] | None = None):
        rng = random.Random(seed)
        if not isinstance(instance, list):
            instance = folder_examples(instance, CaptionRules(instance_prompt=instance_prompt if instance_prompt is not None else ""))
        self.examples: list[Example] = instance
        self.prompts: list[str] = list(dict.fromkeys(e.caption for e in instance))
        ids = {caption: i for i, caption in enumerate(self.prompts)}

        def prepare(images, sizes=None):
            return [to_training_tensor(img, resolution, center_crop, random_flip and rng.random() < 0.5, rng,
                                       None if sizes is None else sizes[i]) for i, img in enumerate(images)]

        images = [load_image(example.image, resolution) for example in instance]
        # --enable_bucket: each image's nearest bucket (h, w) by aspect ratio; else every image the square
        self.sizes = [nearest_bucket(im.height, im.width, buckets) if buckets else (resolution, resolution) for im in images]
        warn_framing([e.name for e in instance], images, self.sizes)
        copies = [max(1, repeats) * example.repeats for example in instance]
        # Round k holds every image with more than k copies: with equal repeats, the folder k times over (the
        # order the crops and flips are drawn in).
        self.example_of = [i for k in range(max(copies)) for i in range(len(instance)) if copies[i] > k]
        self.instance = prepare([images[i] for i in self.example_of], [self.sizes[i] for i in self.example_of])
        self.prompt_ids = [ids[instance[i].caption] for i in self.example_of]
        self.klass = []
        if class_dir is not None:
            self.klass = prepare(list_images(class_dir, "--class_data_dir", resolution)[: num_class_images or None])
            self.prompts.append(class_prompt or "")
        self.class_prompt_id = len(self.prompts) - 1

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass))

    def __getitem__(self, index: int) -> dict:
        at = index % len(self.instance)
        item = {"instance": self.instance[at], "prompt_id": self.prompt_ids[at]}
        if self.klass:
            item["class"] = self.klass[index % len(self.klass)]
            item["class_prompt_id"] = self.class_prompt_id
        return item

    @torch.no_grad()
    def cache(self, encode: Callable[..., torch.Tensor]) -> None:
        """Replace every image's pixels by its latent distribution's parameters (``encode(pixels, caption=,
        bucket=)``: (1, 3, H, W) -> (1, 2C, h, w), mean and log-variance; the caption and the [w, h] bucket go
        into a disk cache's key), computed once; each step then samples its own latent from it."""
        captioned = [(image, self.prompts[i]) for image, i in zip(self.instance, self.prompt_ids)]
        captioned += [(image, self.prompts[self.class_prompt_id]) for image in self.klass]
        for image, caption in captioned:
            image.latent_params = encode(image.pixels.unsqueeze(0), caption=caption, bucket=[image.target_size[1], image.target_size[0]])[0].cpu()
            image.pixels = None

    def prompt_id(self, prompt: str) -> int:
        """The id of ``prompt`` in ``prompts``, appended when new (the empty prompt of caption dropout)."""
        if prompt not in self.prompts:
            self.prompts.append(prompt)
        return self.prompts.index(prompt)

    def bucket_counts(self) -> dict[str, int]:
        """Training items (repeats included) per bucket, ``"<width>x<height>"`` (``dataset.json``)."""
        counts: dict[str, int] = {}
        for image in self.instance:
            name = f"{image.target_size[1]}x{image.target_size[0]}"
            counts[name] = counts.get(name, 0) + 1
        return counts

    def record(self) -> dict:
        """What this run trains on (``dataset.json``): every instance image with its caption as used, where the
        caption came from, its repeats and its bucket; the counts per bucket and per caption source."""
        first = {}
        for at, index in enumerate(self.example_of):
            first.setdefault(index, at)
        images = []
        for index, example in enumerate(self.examples):
            height, width = self.instance[first[index]].target_size
            images.append({"image": example.name, "caption": example.caption, "caption_source": example.caption_source,
                           "repeats": self.example_of.count(index), "bucket": [width, height]})
        sources: dict[str, int] = {}
        for example in self.examples:
            sources[example.caption_source] = sources.get(example.caption_source, 0) + 1
        return {"images": images, "items_per_epoch": len(self.instance), "buckets": self.bucket_counts(),
                "caption_sources": sources, "class_images": len(self.klass)}


def warn_framing(names: list[str], images: list[Image.Image], sizes: list[tuple[int, int]]) -> None:
    """One warning naming the images their training size (h, w) treats badly: upscaled more than 2x, or losing
    more than a quarter of one side to the crop (a square crop of an image beyond 4:3)."""
    upscaled, cropped = [], []
    for name, image, (h, w) in zip(names, images, sizes):
        scale = max(w / image.width, h / image.height)  # the cover resize of to_training_tensor
        if scale > 2:
            upscaled.append(f"{name} ({image.width}x{image.height} -> {w}x{h})")
        lost = max(1 - w / (image.width * scale), 1 - h / (image.height * scale))
        if lost > 0.25:
            cropped.append(f"{name} ({image.width}x{image.height}, {lost:.0%})")
    parts = []
    if upscaled:
        parts.append(f"{len(upscaled)} upscaled more than 2x (use larger images or lower --resolution): {', '.join(upscaled)}")
    if cropped:
        parts.append(f"{len(cropped)} losing more than a quarter of one side to the crop (crop them yourself to keep "
                     f"what matters, or --enable_bucket): {', '.join(cropped)}")
    if parts:
        warnings.warn("training images: " + "; ".join(parts), stacklevel=3)


def drop_captions(prompt_ids: torch.Tensor, instances: int, rate: float, empty_id: int, seed: int, step: int,
                  micro: int, process: int) -> torch.Tensor:
    """Caption dropout: each of the first ``instances`` prompt ids (the instance half; class images keep theirs)
    becomes ``empty_id`` with probability ``rate``. The draws come from their own generator seeded by (seed, update
    step, micro-batch, process), so they repeat exactly on resume and take nothing from the training draws."""
    # step_generator's mixing of the same four numbers, on a CPU generator of its own (+1: not the same stream)
    generator = step_generator(seed + 1, step, micro, process, "cpu")
    drop = torch.rand(instances, generator=generator) < rate
    ids = prompt_ids.clone()
    ids[:instances][drop] = empty_id
    return ids


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
