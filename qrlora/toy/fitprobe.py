"""How well a denoiser fits a training image: the fixed-noise evaluation loss that proves an adapter learned.

A ``FitProbe`` loads a pipeline's parts once, preprocesses one instance image exactly as the trainer does
(same resolution, seed, crop), encodes its prompt, and then scores any denoiser with
``qrlora.core.objective.evaluation_loss``: the unweighted training loss at fixed noise levels with fixed noise, on the
latent mean. The number depends only on the denoiser's weights, so "adapted / base < 1 - margin" is a test of
learning (docs/ARCHITECTURE.md s. 3a) and ``bench/convergence.py`` plots it against steps.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backbones import detect_backbone
from ..files.checkpoint import load_adapter
from ..training.data import DreamBoothDataset, collate
from ..core.inject import attach_adapter
from ..core.objective import evaluation_loss


class FitProbe:
    """Scores denoisers of the pipeline at ``model_path`` on the first image of ``image_dir`` and ``prompt``."""

    def __init__(self, model_path: str | Path, image_dir: str | Path, prompt: str, *, resolution: int,
                 seed: int = 0, center_crop: bool = False, max_sequence_length: int | None = None,
                 guidance_scale: float | None = None):
        self.model_path = str(model_path)
        self.backbone = detect_backbone(self.model_path)
        parts = self.backbone.load(self.model_path)
        self.scheduler = parts.scheduler
        self.objective = self.backbone.objective(parts.scheduler, guidance_scale=guidance_scale)
        self.schedule = self.backbone.noise_schedule(parts.scheduler)
        length = max_sequence_length or self.backbone.default_max_sequence_length
        dataset = DreamBoothDataset(image_dir, resolution=resolution, center_crop=center_crop, seed=seed, instance_prompt=prompt)
        batch = collate([dataset[0]])
        with torch.no_grad():
            table = self.backbone.encode_prompts(parts.text_pipeline, dataset.prompts, "cpu", length)  # caption files win
            vae = parts.vae.float()
            raw = vae.encode(batch["pixels"]).latent_dist.mode()  # the mean: no sampling noise in the score
            self.latents = self.backbone.normalize_latents(vae.config, raw)
        self.cond = self.backbone.batch_cond(table, batch)
        self._base = parts.denoiser.eval()

    def base_denoiser(self) -> nn.Module:
        """A fresh copy of the base denoiser, as stored."""
        return self.backbone.load_denoiser(self.model_path).eval()

    def adapted_denoiser(self, adapter_path: str | Path) -> nn.Module:
        """The base denoiser with the adapter file at ``adapter_path`` attached (read back from disk)."""
        adapter = load_adapter(adapter_path)
        denoiser = self.base_denoiser()
        attach_adapter(denoiser, adapter.config, adapter.layers, source=str(adapter_path))
        return denoiser

    def loss(self, denoiser: nn.Module | None = None) -> float:
        """Fixed-noise evaluation loss of ``denoiser`` (default: the base) on the probe's image and prompt."""
        denoiser = self._base if denoiser is None else denoiser
        predict = self.backbone.predictor(denoiser, self.objective)
        return evaluation_loss(predict, self.latents, self.cond, self.schedule, self.objective)
