"""The interface every backbone implements, and the flow-matching objective SD3 and FLUX share.

A backbone is a small object that knows one model family: how to load its parts from a diffusers folder or
hub id, encode prompts (through the pipeline's own ``encode_prompt``), turn pixels into latents, compute the
family part of the training objective, and build the inference pipeline. It knows nothing about adapter methods
(docs/ARCHITECTURE.md s. 3).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from ..errors import UserError
from ..core.devices import stored_dtype
from ..core.objective import Cond, NoiseSchedule, Objective, loss_per_sample


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


def discarded_linears(model: nn.Module) -> set[str]:
    """Paths of the Linears whose output ``model`` computes and throws away, read from each module's own config.

    An MMDiT attention with ``context_pre_only=True`` (SD3's last joint block; diffusers' ``Attention`` and
    ``FluxAttention`` carry the flag) still projects the context queries with ``add_q_proj``, but its block
    returns no context output (``encoder_hidden_states = None``), and the context query rows of the joint
    attention only ever feed that output. Such a layer never receives a gradient: adapting it wastes parameters
    and puts a ``dW = 0`` layer into every similarity. (``add_k_proj`` / ``add_v_proj`` stay: image queries
    attend to the context keys and values.) FLUX's attentions have ``context_pre_only`` False or None, SDXL's
    UNet no context stream, so nothing is discarded there.
    """
    found = set()
    for name, module in model.named_modules():
        if getattr(module, "context_pre_only", None) is True and getattr(module, "add_q_proj", None) is not None:
            found.add(f"{name}.add_q_proj" if name else "add_q_proj")
    return found


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
    # Training defaults the trainer fills (``TrainSettings.for_backbone``): the model id, the image size, the
    # folder runs go in, and whether a run's folder name ends in its method (``<run_name>[-<method>]``). The
    # inference wrappers read default_model and the two below with scripts/backbone_defaults.py, without
    # importing this package, so keep them literals.
    default_model: str = ""
    default_resolution: int = 512
    run_root: str = ""
    run_name_has_method: bool = True
    # The merge-inference wrappers' defaults (the published inference scripts): denoising steps and image size.
    default_inference_steps: int = 28
    default_image_size: int = 1024
    default_targets: tuple[str, ...] = ()
    default_objective: Objective = Objective()
    default_max_sequence_length: int = 77
    vae_in_float32: bool = False  # encode in float32 whatever the mixed precision (diffusers' SD3 / SDXL scripts)
    text_encoder_names: tuple[str, ...] = ()
    # The original checkpoint layout for kohya-style LoRA files; empty: the diffusers module names are kept.
    original_layout: tuple[OriginalModule, ...] = ()
    # (denoiser attribute, config key of its length) of each list of transformer blocks, in execution order
    # (``--blocks_to_swap``); empty: the family has no list of uniform blocks to swap.
    block_lists: tuple[tuple[str, str], ...] = ()
    # The denoiser's stages in forward order, (top-level container, block kind, tick prefix): the analyses order and
    # label layers by them (qrlora.evaluation.analysis.ordering).
    block_stages: tuple[tuple[str, str, str], ...] = ()
    published_config: dict[str, Any] = {}  # the full-size denoiser's config.json (set by each family)

    # ---- loading ------------------------------------------------------------------------------------
    def pipeline_cls(self):
        return getattr(diffusers, self.pipeline_class)

    def load_denoiser(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        """The denoiser in ``dtype``; None: in the dtype its checkpoint stores (``devices.stored_dtype``), never
        diffusers' default upcast to float32."""
        cls = getattr(diffusers, self.denoiser_class)
        dtype = dtype or stored_dtype(model_path, self.denoiser_name)
        return cls.from_pretrained(model_path, subfolder=self.denoiser_name, torch_dtype=dtype)

    def load(self, model_path: str, *, vae_path: str | None = None, denoiser_dtype: torch.dtype | None = None,
             text_dtype: torch.dtype = torch.float32) -> Components:
        """Load the denoiser (as stored, or in ``denoiser_dtype``), the VAE, the scheduler, and the text parts."""
        vae = self.load_vae(model_path, vae_path)
        scheduler = self.load_scheduler(model_path)
        text_pipeline = self.load_text_pipeline(model_path, text_dtype)
        return Components(self.load_denoiser(model_path, denoiser_dtype), vae, scheduler, text_pipeline)

    def load_vae(self, model_path: str, vae_path: str | None = None) -> nn.Module:
        """The pipeline's VAE, or the separate one at ``vae_path`` (a folder or hub id holding the VAE itself)."""
        return diffusers.AutoencoderKL.from_pretrained(vae_path or model_path, subfolder=None if vae_path else "vae")

    def load_text_pipeline(self, model_path: str, dtype: torch.dtype = torch.float32):
        """The pipeline with its text encoders and tokenizers only (no denoiser, no VAE), for ``encode_prompts``."""
        return self.pipeline_cls().from_pretrained(model_path, torch_dtype=dtype, **{self.denoiser_name: None, "vae": None})

    def load_scheduler(self, model_path: str):
        """The pipeline's scheduler, freshly built (cheap: a config file). Any scheduler class reads
        ``scheduler/scheduler_config.json`` (folder or hub id); ``_class_name`` picks the real one."""
        config = diffusers.DDPMScheduler.load_config(model_path, subfolder="scheduler")
        return getattr(diffusers, config["_class_name"]).from_config(config)

    def inference_pipeline(self, model_path: str, denoiser: nn.Module, *, dtype: torch.dtype | None = None,
                           with_text: bool = True, **parts):
        """The diffusers pipeline around ``denoiser`` (text encoders dropped when prompts come pre-encoded)."""
        drop = {name: None for name in self.text_encoder_names} if not with_text else {}
        return self.pipeline_cls().from_pretrained(
            model_path, torch_dtype=dtype, **{self.denoiser_name: denoiser}, **drop, **parts
        )

    def transformer_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """The denoiser's transformer blocks in the order its forward runs them (``block_lists`` concatenated)."""
        return [block for name, _ in self.block_lists for block in getattr(denoiser, name)]

    def tiny_pipeline(self, seed: int, parts):
        """This family's offline tiny random pipeline (``python -m qrlora.tiny``), built from ``parts``
        (``qrlora.toy.tiny``'s seeded tokenizers, text encoders, VAE and schedulers, handed in: the registry imports
        nothing from the toy layer). A new family implements it; the tiny builder reads it from here."""
        raise NotImplementedError(f"{self.name}: no tiny pipeline")

    def meta_denoiser(self, **overrides) -> nn.Module:
        """The full-size published denoiser (``published_config``, ``overrides`` on top) on the meta device: the
        real module tree and shapes, no storage, no download."""
        with torch.device("meta"):
            return getattr(diffusers, self.denoiser_class).from_config({**self.published_config, **overrides})

    def shard_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """The modules an FSDP launch shards the frozen base in (``qrlora.training.sharding``), each gathered whole just
        before it runs: the transformer blocks; what lies outside them is one more unit, with the root."""
        return self.transformer_blocks(denoiser)

    def count_transformer_blocks(self, model_path: str) -> int:
        """How many blocks ``transformer_blocks`` will return, from the denoiser's config alone (nothing loaded)."""
        if not self.block_lists:
            return 0
        config = getattr(diffusers, self.denoiser_class).load_config(model_path, subfolder=self.denoiser_name)
        return sum(int(config[key]) for _, key in self.block_lists)

    # ---- prompts and latents --------------------------------------------------------------------------
    def encode_prompts(self, text_pipeline, prompts: list[str], device, max_sequence_length: int) -> Cond:
        """Conditioning tensors for each prompt, stacked along dim 0 (prompt i at index i)."""
        raise NotImplementedError

    def negative_cond(self, text_pipeline, device, max_sequence_length: int) -> Cond:
        """The unconditional (negative) conditioning the pipeline itself would use for an empty prompt."""
        return self.encode_prompts(text_pipeline, [""], device, max_sequence_length)

    def batch_cond(self, table: Cond, batch: dict) -> Cond:
        """Each sample's conditioning: its prompt's row of the per-prompt ``table`` (``batch["prompt_ids"]``)."""
        ids = batch["prompt_ids"]
        return {k: v[ids.to(v.device)] for k, v in table.items()}

    def pipeline_prompt_kwargs(self, positive: Cond, negative: Cond) -> dict:
        """Keyword arguments that hand pre-encoded prompts to the pipeline's ``__call__``."""
        raise NotImplementedError

    def normalize_latents(self, vae_config, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the denoiser's latent space: ``(z - shift) * scaling`` (SD3 / FLUX)."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (raw - shift) * vae_config.scaling_factor

    def latents_from_pixels(self, vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised VAE latents of (B, 3, H, W) pixels in [-1, 1], sampled from the latent distribution."""
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return self.normalize_latents(vae.config, dist.sample(generator))

    # ---- objective ------------------------------------------------------------------------------------
    def objective(self, scheduler, **overrides) -> Objective:
        """This family's training objective; ``overrides`` that are not None replace the defaults (flags)."""
        return replace(self.default_objective, **{k: v for k, v in overrides.items() if v is not None})

    def noise_schedule(self, scheduler) -> NoiseSchedule:
        """The frozen training noise table of the pipeline's scheduler (see ``qrlora.core.objective``)."""
        return NoiseSchedule.from_scheduler(scheduler)

    def predict(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Cond,
                objective: Objective) -> torch.Tensor:
        """The denoiser's output for ``noisy`` latents (B, C, h, w), same shape."""
        raise NotImplementedError

    def training_loss(self, denoiser: nn.Module, latents: torch.Tensor, cond: Cond, schedule: NoiseSchedule,
                      objective: Objective, generator: torch.Generator | None = None) -> torch.Tensor:
        """The one training step's loss per sample (B,): ``qrlora.core.objective.loss_per_sample`` on this family."""
        return loss_per_sample(self.predictor(denoiser, objective), latents, cond, schedule, objective, generator)

    def predictor(self, denoiser: nn.Module, objective: Objective):
        """``predict`` bound to ``denoiser`` and ``objective``: the ``(noisy, timesteps, cond) -> output`` callable."""
        return lambda noisy, timesteps, cond: self.predict(denoiser, noisy, timesteps, cond, objective)


class FlowMatchingBackbone(Backbone):
    """Rectified-flow families (SD3, Esser et al., 2024; FLUX): ``x_t = (1 - t) x_0 + t e``, target ``e - x_0``."""

    default_objective = Objective(prediction_type="flow")
