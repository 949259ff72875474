"""Typed settings of merge rendering and merge strategies: what the library reads, built once.

The commands build them from their flags (``qrlora.cli.arguments.settings_from``); programmatic users (the world
experiment and study, the benches, the tests) build them directly. Every field is checked in ``__post_init__``
with a message that names the flag the value came from, so a bad value is refused before any model loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.devices import DTYPES
from ..errors import UserError, seed_problem
from .klora import KLORA_ALPHA, KLORA_BETA, KLORA_K
from .ziplora import ZIPLORA_LAMBDA, ZIPLORA_LR, ZIPLORA_STEPS

MAJORITY_SIGNS = ("total", "frequency")  # PEFT's TIES majority_sign_method


@dataclass(frozen=True)
class RenderSettings:
    """How a merged pipeline renders one image (the rendering flags, ``add_render_arguments``).

    ``guidance_scale``, ``dtype``, ``device`` and ``max_sequence_length`` left None take the pipeline's or the
    machine's default (bfloat16 on a GPU, float32 on the CPU).
    """

    prompt: str = "a photo of a <c> cat in <s> style"
    num_inference_steps: int = 28
    guidance_scale: float | None = None
    height: int = 1024
    width: int = 1024
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    max_sequence_length: int | None = None

    def __post_init__(self):
        for flag in ("height", "width"):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
                raise UserError(f"--{flag} must be a positive multiple of 16 (the latent patch size), got {value}")
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps < 1:
            raise UserError(f"--num_inference_steps must be positive, got {self.num_inference_steps}")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise UserError(f"--guidance_scale must be a finite number, got {self.guidance_scale}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise UserError(f"--max_sequence_length must be positive, got {self.max_sequence_length}")
        if problem := seed_problem("--seed", self.seed):
            raise UserError(problem)

    def png_bytes(self, count: int) -> int:
        """Upper bound on the bytes of ``count`` RGB PNGs at this size (uncompressed, plus headers)."""
        return count * (self.height * self.width * 3 + 4096)

    def call_kwargs(self) -> dict:
        """The pipeline-call keywords of one render but the prompt: steps, size, a seeded generator, guidance and
        the T5 length when given."""
        import torch

        kwargs = {"num_inference_steps": self.num_inference_steps, "height": self.height, "width": self.width,
                  "generator": torch.Generator("cpu").manual_seed(self.seed)}
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        return kwargs


@dataclass(frozen=True)
class StrategySettings:
    """The strategies' own knobs (``add_strategy_options``): ZipLoRA's learning, K-LoRA's switch, TIES / DARE."""

    ziplora_steps: int = ZIPLORA_STEPS
    ziplora_lr: float = ZIPLORA_LR
    ziplora_lambda: float = ZIPLORA_LAMBDA
    content_prompt: str | None = None
    style_prompt: str | None = None
    klora_k: int = KLORA_K
    klora_alpha: float = KLORA_ALPHA
    klora_beta: float = KLORA_BETA
    merge_density: float = 0.5
    ties_majority_sign: str = "total"

    def __post_init__(self):
        if self.ziplora_steps < 0:
            raise UserError(f"--ziplora_steps must be >= 0, got {self.ziplora_steps}")
        for flag in ("ziplora_lr", "ziplora_lambda", "klora_alpha", "klora_beta"):
            if not math.isfinite(getattr(self, flag)):
                raise UserError(f"--{flag} must be a finite number, got {getattr(self, flag)}")
        if self.klora_k < 1:
            raise UserError(f"--klora_k must be a positive integer, got {self.klora_k}")
        if not 0 < self.merge_density <= 1:
            raise UserError(f"--merge_density must be in (0, 1], got {self.merge_density}")
        if self.ties_majority_sign not in MAJORITY_SIGNS:
            raise UserError(f"--ties_majority_sign must be one of {', '.join(MAJORITY_SIGNS)}, "
                            f"got {self.ties_majority_sign!r}")
