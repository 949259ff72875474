"""Validation images to the experiment trackers the trainer reports to (``--report_to tensorboard|wandb``).

Losses and the learning rate go through ``accelerator.log``; images need each tracker's own image type.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image


def log_validation_images(trackers: Iterable, images: Sequence[Path], step: int, prompt: str) -> None:
    """Log the saved validation ``images`` (PNG files) at ``step`` to every tracker that takes images."""
    if not images:
        return
    for tracker in trackers:
        if tracker.name == "tensorboard":
            pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])  # (N, H, W, 3) uint8
            tracker.writer.add_images("validation", pixels, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(str(p), caption=f"{i}: {prompt}") for i, p in enumerate(images)]}, step=step)
