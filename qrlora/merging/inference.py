"""Merge rendering: a diffusers pipeline whose denoiser merges adapters with a strategy (``MergedPipeline``), the
weight parsing and the labelled grid every merge command shares.

The commands live in ``qrlora.cli.merge``: every published inference entry point (``flux_dir/inference_merge_residual.py``,
``SD3_dir/inference_ica.py``, ``SD3_dir/inference_moe.py``, ``SD3_dir/inference.sh``) is ``render_grid`` (a style
and a content adapter over a grid of weights, one PNG per pair and ``grid.png``); ``python -m qrlora.merge`` is
``merge_adapters`` (any number of adapters with one weight each, optional ``--save_merged``). They build the typed
``RenderSettings`` / ``StrategySettings`` (``qrlora.merging.settings``) once and check everything before anything
is written, so bad input leaves the output folder untouched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont

from ..backbones import COMPONENTS, detect_backbone
from ..core.devices import resolve_device, resolve_dtype
from ..core.prompts import warn_truncated
from ..errors import UserError
from ..files.checkpoint import AdapterFile, load_residual
from ..files.outputs import atomic_output
from .merger import check_mergeable
from .settings import RenderSettings, StrategySettings
from .strategies import STRATEGIES, check_strategy



def parse_weights(text: str, flag: str) -> list[float]:
    """``"0,0.5,1.0"`` -> ``[0.0, 0.5, 1.0]``; a ``UserError`` naming ``flag`` if it does not parse."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: '{text}' is not a comma-separated list of numbers") from None
    if not values:
        raise UserError(f"{flag}: no weights given")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag}: '{text}' holds a value that is not a finite number")
    return values


def save_image(image: Image.Image, path: Path) -> Path:
    """Write a PNG under a temporary name, then rename: a full disk never leaves a 0-byte or truncated image."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def merged_size_estimate(model_path: str) -> int:
    """Bytes a saved merged denoiser takes: its weight files in a local pipeline folder (0 for a hub id)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for sub in COMPONENTS for f in (folder / sub).glob("*.safetensors"))


class MergedPipeline:
    """A diffusers pipeline whose denoiser merges the given adapters with a merge strategy (``--merge_strategy``).

    ``roles`` = (index of the content adapter, index of the style adapter), for the strategies that merge a pair;
    ``strategy=None`` loads the pipeline and leaves the adapters to the caller. ``render`` says how it renders,
    ``settings`` the strategies' own knobs (``qrlora.merging.settings``, typed and checked). Every input is checked, then
    ``check_outputs()`` runs (still before the pipeline loads), then the pipeline loads and the adapters attach.
    """

    def __init__(self, model_path: str, adapters: list[AdapterFile], residual_path: str | None, render: RenderSettings,
                 strategy: str | None = "direct", roles: tuple[int, int] = (0, 1),
                 check_outputs: Callable[[], None] = lambda: None, settings: StrategySettings = StrategySettings()):
        self.backbone = detect_backbone(model_path)
        for adapter in adapters:
            if adapter.backbone and adapter.backbone != self.backbone.name:
                raise UserError(f"{adapter.path} is a {adapter.backbone} adapter, {model_path} a {self.backbone.name} pipeline")
            if adapter.component != self.backbone.denoiser_name:
                raise UserError(f"{adapter.path} adapts a {adapter.component}, {model_path} has a {self.backbone.denoiser_name}")
        if strategy is not None:
            check_strategy(strategy, adapters, residual_path)
        residual = load_residual(residual_path) if residual_path else None
        check_mergeable(adapters, residual)
        check_outputs()
        self.render_settings = render
        self.device = str(resolve_device(render.device))
        dtype = resolve_dtype(render.dtype, self.device)
        self.pipe = self.backbone.pipeline_cls().from_pretrained(model_path, torch_dtype=dtype)
        self.denoiser = getattr(self.pipe, self.backbone.denoiser_name)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        tokenizers = {name: getattr(self.pipe, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
                      if getattr(self.pipe, name, None) is not None}
        warn_truncated(tokenizers, render.prompt, render.max_sequence_length, "--prompt")  # names the words cut
        self.strategy_name = strategy
        self.strategy = None if strategy is None else STRATEGIES[strategy](
            self.pipe, self.denoiser, adapters, residual, roles, settings, render)

    @property
    def merger(self):
        """The weight-folding ``Merger`` of strategies that fold (None for K-LoRA's live switch)."""
        return self.strategy.merger

    def save_merged(self, weights: list[float], folder: str | Path) -> Path:
        """The strategy's own merge (TIES / DARE trim or drop, ZipLoRA scales: what ``render`` would use) folded into
        the weights, even bf16 ones (a saved checkpoint is plain weights), and the denoiser written to ``folder`` in
        the diffusers layout, atomically (a full disk leaves no half-written model). The CLI and the UI save here."""
        with self.merger.folding():
            self.strategy.apply(weights, self.render_settings.num_inference_steps)
        with atomic_output(folder, folder=True) as tmp:
            self.denoiser.save_pretrained(tmp)
        return Path(folder)

    def render(self, weights: list[float], render: RenderSettings | None = None) -> Image.Image:
        """One image at these adapter weights (``render``: this pipeline's settings unless given); the seed fixes the
        starting noise, so only the weights differ."""
        render = render or self.render_settings
        extra = self.strategy.apply(weights, render.num_inference_steps)
        with torch.no_grad():
            return self.pipe(prompt=render.prompt, **render.call_kwargs(), **extra).images[0]


def adapters_method(adapters: list[AdapterFile]) -> str:
    """The methods of the merged adapters, for manifests (``triu_deltaR``, ``lora+triu_deltaR``)."""
    return "+".join(sorted({a.config.method for a in adapters}))


def label_grid(images: dict[tuple[float, float], Image.Image], style_weights, content_weights) -> Image.Image:
    """Columns = style weight, rows = content weight, weights written on the axes."""
    w, h = next(iter(images.values())).size
    font = ImageFont.load_default(size=max(10, min(w, h) // 6))
    margin = max(40, font.size * 4)
    grid = Image.new("RGB", (margin + w * len(style_weights), margin + h * len(content_weights)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), "rows: content, columns: style", fill="black", font=ImageFont.load_default(size=max(8, font.size // 2)))
    for col, s in enumerate(style_weights):
        draw.text((margin + col * w + w // 2, margin // 2), f"s={s:.2f}", fill="black", font=font, anchor="mm")
    for row, c in enumerate(content_weights):
        draw.text((margin // 2, margin + row * h + h // 2), f"c={c:.2f}", fill="black", font=font, anchor="mm")
        for col, s in enumerate(style_weights):
            grid.paste(images[(s, c)], (margin + col * w, margin + row * h))
    return grid
