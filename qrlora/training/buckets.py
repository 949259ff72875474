"""Aspect-ratio buckets (``--enable_bucket``, kohya's name): training sizes of about ``--resolution``² pixels at
many aspect ratios, each image assigned to the nearest (diffusers' ``find_nearest_bucket``), and batches that draw
from one bucket at a time.

A bucket's sides are multiples of what the model needs: the VAE's downsampling times the denoiser's own (its patch
size, FLUX's 2x2 packing, a UNet's downsampling), read from the model's config files. Batches are a function of
(seed, epoch, process) only, so a resumed run sees exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers.training_utils import find_nearest_bucket

MAX_ASPECT = 4.0  # the widest bucket is 4:1 (and the tallest 1:4), as kohya's defaults allow


def _config(model_path: str, folder: str) -> dict:
    local = Path(model_path) / folder / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(model_path, "config.json", subfolder=folder))
    return json.loads(local.read_text())


def side_multiple(model_path: str, denoiser_folder: str) -> int:
    """Pixels a bucket side must be a multiple of: VAE factor x the denoiser's latent granularity (at least 2,
    which FLUX's 2x2 token packing needs; a UNet's ``2 ** (blocks - 1)``; a transformer's ``patch_size``)."""
    vae = _config(model_path, "vae")
    denoiser = _config(model_path, denoiser_folder)
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    unet = 2 ** (len(denoiser["block_out_channels"]) - 1) if "block_out_channels" in denoiser else 1
    return vae_factor * max(2, int(denoiser.get("patch_size") or 1), unet)


def make_buckets(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """(height, width) sizes of about ``resolution``² pixels, sides multiples of ``multiple``, aspect within
    1:4 .. 4:1; the square ``resolution`` rounded to ``multiple`` among them."""
    area = resolution * resolution
    buckets = set()
    for width in range(multiple, int(resolution * 2) + 1, multiple):
        height = max(multiple, round(area / width / multiple) * multiple)
        if 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            buckets |= {(height, width), (width, height)}  # landscape and portrait alike
    side = max(multiple, round(resolution / multiple) * multiple)
    buckets.add((side, side))
    return sorted(buckets)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``height`` x ``width``."""
    return buckets[find_nearest_bucket(height, width, buckets)]


def bucket_batches(sizes: list[tuple[int, int]], batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of one epoch, each from one bucket: within every bucket a permutation seeded by
    (seed, epoch), cut into batches (a short last batch filled from the start of its bucket), all batches in a
    seeded order, dealt across processes (the list repeated so every process gets as many)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(index)
    batches = []
    for size in sorted(groups):
        members = groups[size]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        count = math.ceil(len(order) / batch_size)
        order = (order * math.ceil(count * batch_size / len(order)))[: count * batch_size]
        batches += [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    steps = math.ceil(len(batches) / world)
    batches = (batches * math.ceil(steps * world / len(batches)))[: steps * world]
    return [batches[s * world + rank] for s in range(steps)]
