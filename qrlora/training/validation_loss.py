"""The held-out validation loss (``--validation_data_dir`` / ``--validation_split``): the loss of images the run
does not train on, at fixed noise and fixed timesteps (``qrlora.core.objective.evaluation_loss``), so two points of
the curve compare the model and nothing else.

It draws from generators of its own and changes no training state: a run with and without it trains the same
adapter. The latents are each image's latent mean (no sampling), encoded once. ``validation_loss.json`` in the run
folder holds every point and the best step, rewritten after each point.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..core.objective import evaluation_loss
from ..errors import UserError
from ..files.outputs import atomic_output
from .data import DreamBoothDataset, collate
from .sources import CaptionRules, Example, folder_examples

RECORD = "validation_loss.json"


def held_out(settings, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training examples, validation examples): ``--validation_data_dir``'s images, or a seeded
    ``--validation_split`` of ``examples`` (at least one image held out, at least one kept), or none."""
    if settings.validation_data_dir:
        rules = CaptionRules(**{**CaptionRules.of(settings).__dict__, "flag": "--validation_data_dir"})
        return examples, folder_examples(settings.validation_data_dir, rules)
    if not settings.validation_split:
        return examples, []
    if len(examples) < 2:
        raise UserError(f"--validation_split {settings.validation_split}: {len(examples)} image(s) cannot be split; "
                        "give --validation_data_dir instead")
    count = min(len(examples) - 1, max(1, round(settings.validation_split * len(examples))))
    chosen = set(random.Random(settings.seed + 7919).sample(range(len(examples)), count))  # not the crops' stream
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


class ValidationLoss:
    """The fixed held-out batches of a run and the loss of the adapted denoiser on them."""

    def __init__(self, backbone, examples: list[Example], settings, encoders, dtype: torch.dtype):
        data = DreamBoothDataset(examples, resolution=settings.resolution, center_crop=True, seed=settings.seed)
        table = {k: v.to(dtype) if v.is_floating_point() else v for k, v in encoders.prompts(data.prompts).items()}
        self.backbone, self.batches, self.points = backbone, [], {}
        size = settings.train_batch_size
        for start in range(0, len(data), size):
            batch = collate([data[i] for i in range(start, min(start + size, len(data)))])
            with torch.no_grad():
                mean = encoders.encode(batch["pixels"]).latent_dist.mode()  # (B, C, h, w): no sampling noise
            latents = backbone.normalize_latents(encoders.config, mean).to(dtype)
            self.batches.append((latents, backbone.batch_cond(table, batch)))
        self.images = len(data)

    def __call__(self, model, schedule, objective, autocast) -> float:
        """The mean fixed-noise loss over the held-out images (weighted by batch size)."""
        was_training = model.training
        model.eval()
        total = 0.0
        with autocast():
            for latents, cond in self.batches:
                total += evaluation_loss(self.backbone.predictor(model, objective), latents, cond, schedule, objective) * len(latents)
        model.train(was_training)
        return total / self.images

    def record(self, step: int, loss: float, folder: Path) -> dict:
        """Add a point and rewrite ``validation_loss.json``: every step's loss, the best step and its loss."""
        self.points[step] = loss
        best = min(self.points, key=self.points.get)
        record = {"images": self.images, "losses": {str(s): v for s, v in self.points.items()},
                  "best_step": best, "best_loss": self.points[best]}
        with atomic_output(Path(folder) / RECORD) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        return record
