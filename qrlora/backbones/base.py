"""The interface every backbone implements, and the flow-matching objective SD3 and FLUX share.

A backbone is a small object that knows one model family: how to load its parts from a diffusers folder or
hub id, encode prompts (through the pipeline's own ``encode_prompt``), turn pixels into latents, compute the
training loss, and build the inference pipeline. It knows nothing about adapter methods (ARCHITECTURE.md s. 3).
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import nn

from ..errors import UserError

Cond = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OriginalModule:
    """One Linear of a model family's original checkpoint layout (the names kohya sd-scripts, ComfyUI and A1111 use)
    and the diffusers Linears whose output rows it stacks.

    ``block`` is a regular expression for the diffusers block path (its groups fill ``name``), ``parts`` the
    module suffixes inside that block in row order, ``rows`` each part's output rows relative to the first part
    (FLUX's single-block ``linear1`` stacks q, k, v and a 4x wider MLP input).
    """

    block: str
    name: str
    parts: tuple[str, ...]
    rows: tuple[int, ...] = ()

    def match(self, path: str) -> tuple[str, int] | None:
        """``(original name, part index)`` of the diffusers ``path``, or None when this module does not hold it."""
        for index, part in enumerate(self.parts):
            found = re.fullmatch(rf"{self.block}\.{re.escape(part)}", path)
            if found:
                return self.name.format(*found.groups()), index
        return None

    def relative_rows(self) -> tuple[int, ...]:
        return self.rows or (1,) * len(self.parts)


def read_model_index(model_path: str) -> dict:
    """``model_index.json`` of a local pipeline folder or a cached hub id; a ``UserError`` if there is none."""
    local = Path(model_path)
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise UserError(f"--pretrained_model_name_or_path: {model_path} has no model_index.json (not a diffusers pipeline)")
        return json.loads(index.read_text())
    try:
        return dict(diffusers.DiffusionPipeline.load_config(model_path))
    except Exception as err:  # hub errors come in many types; all mean "cannot find this model"
        raise UserError(
            f"--pretrained_model_name_or_path: cannot find {model_path} (not a local folder, not in the hub cache: "
            f"{type(err).__name__})"
        ) from None


@dataclass
class Components:
    """The parts training needs; text encoders live in ``text_pipeline`` until prompts are encoded."""

    denoiser: nn.Module
    vae: nn.Module
    scheduler: Any
    text_pipeline: Any


class Backbone:
    """One model family. Subclasses set the class attributes and implement the marked methods."""

    name: str = ""
    pipeline_class: str = ""  # diffusers pipeline class name, as in model_index.json
    denoiser_name: str = "transformer"  # folder and component name of the trained network
    denoiser_class: str = ""
    default_model: str = ""
    default_targets: tuple[str, ...] = ()
    default_weighting_scheme: str = "none"
    text_encoder_names: tuple[str, ...] = ()
    # The original checkpoint layout for kohya-style LoRA files; empty: the diffusers module names are kept.
    original_layout: tuple[OriginalModule, ...] = ()

    # ---- loading ------------------------------------------------------------------------------------
    def pipeline_cls(self):
        return getattr(diffusers, self.pipeline_class)

    def load_denoiser(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        cls = getattr(diffusers, self.denoiser_class)
        return cls.from_pretrained(model_path, subfolder=self.denoiser_name, torch_dtype=dtype)

    def load(self, model_path: str, *, vae_path: str | None = None, denoiser_dtype: torch.dtype | None = None,
             text_dtype: torch.dtype = torch.float32) -> Components:
        """Load the denoiser (as stored, or in ``denoiser_dtype``), the VAE, the scheduler, and the text parts."""
        vae = diffusers.AutoencoderKL.from_pretrained(vae_path or model_path, subfolder=None if vae_path else "vae")
        # Any scheduler class reads ``scheduler/scheduler_config.json`` (folder or hub id); ``_class_name`` picks the real one.
        scheduler_config = diffusers.DDPMScheduler.load_config(model_path, subfolder="scheduler")
        scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
        text_pipeline = self.pipeline_cls().from_pretrained(
            model_path, torch_dtype=text_dtype, **{self.denoiser_name: None, "vae": None}
        )
        return Components(self.load_denoiser(model_path, denoiser_dtype), vae, scheduler, text_pipeline)

    def inference_pipeline(self, model_path: str, denoiser: nn.Module, *, dtype: torch.dtype | None = None,
                           with_text: bool = True, **parts):
        """The diffusers pipeline around ``denoiser`` (text encoders dropped when prompts come pre-encoded)."""
        drop = {name: None for name in self.text_encoder_names} if not with_text else {}
        return self.pipeline_cls().from_pretrained(
            model_path, torch_dtype=dtype, **{self.denoiser_name: denoiser}, **drop, **parts
        )

    # ---- prompts and latents --------------------------------------------------------------------------
    def encode_prompts(self, text_pipeline, prompts: list[str], device, args: argparse.Namespace) -> Cond:
        """Conditioning tensors for each prompt, stacked along dim 0 (prompt i at index i)."""
        raise NotImplementedError

    def batch_cond(self, table: Cond, prompt_ids: torch.Tensor) -> Cond:
        """Pick each sample's conditioning from the per-prompt ``table``."""
        return {k: v[prompt_ids] for k, v in table.items()}

    def pipeline_prompt_kwargs(self, positive: Cond, negative: Cond) -> dict:
        """Keyword arguments that hand pre-encoded prompts to the pipeline's ``__call__``."""
        raise NotImplementedError

    def latents_from_pixels(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised VAE latents of (B, 3, H, W) pixels in [-1, 1]."""
        cfg = vae.config
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (latents - shift) * cfg.scaling_factor

    # ---- objective ------------------------------------------------------------------------------------
    def loss_per_sample(self, denoiser: nn.Module, latents: torch.Tensor, cond: Cond, scheduler, args) -> torch.Tensor:
        """The training loss of each sample, shape (B,)."""
        raise NotImplementedError

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Backbone-specific flags (added to the one trainer's parser)."""


class FlowMatchingBackbone(Backbone):
    """Rectified-flow objective of SD3 (Esser et al., 2024) and FLUX: ``x_t = (1 - t) x_0 + t e``, target ``e - x_0``."""

    def predict(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond, args) -> torch.Tensor:
        """The denoiser's velocity prediction, same shape as ``noisy`` (B, C, h, w)."""
        raise NotImplementedError

    def loss_per_sample(self, denoiser, latents, cond, scheduler, args):
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)
        # Timestep density (logit-normal, mode, uniform) and weighting from diffusers.training_utils.
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme, batch_size=bsz,
            logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
        )
        indices = (u * scheduler.config.num_train_timesteps).long().clamp_max(len(scheduler.timesteps) - 1)
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(bsz, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        pred = self.predict(denoiser, noisy, timesteps, cond, args)
        if getattr(args, "precondition_outputs", False):
            pred, target = pred * (-sigmas) + noisy, latents  # EDM-style: predict x_0
        else:
            target = noise - latents
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)
