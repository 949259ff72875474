"""Merge inference: combine adapters with chosen weights and render images (published scripts + ``qrlora.merging.merger``).

Every published inference entry point (``flux_dir/inference_merge_residual.py``, ``SD3_dir/inference_ica.py``,
``SD3_dir/inference_moe.py``, ``SD3_dir/inference.sh``) is ``render_grid``: a style and a content adapter, a grid
of weights (the product of two comma lists), one PNG per pair and ``grid.png``. ``python -m qrlora.merge`` is
``merge_adapters``: any number of adapters with one weight each, optional ``--save_merged``. Their flags live in
``qrlora.cli.merge`` (``grid_main``, ``merge_main``).

Everything is checked before anything is written, so bad input leaves the output folder untouched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..backbones import detect_backbone
from ..backbones import COMPONENTS
from ..files.checkpoint import AdapterFile, load_adapter, load_residual
from ..core.devices import resolve_device, resolve_dtype
from ..errors import UserError
from ..evaluation.evaluate import MANIFEST, ImageRecord, write_manifest
from .merger import check_mergeable
from ..files.outputs import atomic_output, check_writable, refuse_existing
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


def check_render_arguments(args) -> None:
    """Rendering flags that cannot work, refused before any model is loaded."""
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value < 16 or value % 16:
            raise UserError(f"--{flag} must be a positive multiple of 16 (the latent patch size), got {value}")
    if args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps must be positive, got {args.num_inference_steps}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise UserError(f"--guidance_scale must be a finite number, got {args.guidance_scale}")


def png_estimate(args, count: int) -> int:
    """Upper bound on the bytes of ``count`` RGB PNGs at the requested size (uncompressed, plus headers)."""
    return count * (args.height * args.width * 3 + 4096)


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
    ``strategy=None`` loads the pipeline and leaves the adapters to the caller. Every input is checked, then
    ``check_outputs()`` runs (still before the pipeline loads), then the pipeline loads and the adapters attach.
    """

    def __init__(self, model_path: str, adapters: list[AdapterFile], residual_path: str | None, args,
                 strategy: str | None = "direct", roles: tuple[int, int] = (0, 1),
                 check_outputs: Callable[[], None] = lambda: None):
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
        self.device = str(resolve_device(args.device))
        dtype = resolve_dtype(args.dtype, self.device)
        self.pipe = self.backbone.pipeline_cls().from_pretrained(model_path, torch_dtype=dtype)
        self.denoiser = getattr(self.pipe, self.backbone.denoiser_name)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.strategy_name = strategy
        self.strategy = None if strategy is None else STRATEGIES[strategy](
            self.pipe, self.denoiser, adapters, residual, roles, args, pipeline_call_kwargs(args))

    @property
    def merger(self):
        """The weight-folding ``Merger`` of strategies that fold (None for K-LoRA's live switch)."""
        return self.strategy.merger

    def render(self, weights: list[float], args) -> Image.Image:
        """One image at these adapter weights; the seed fixes the starting noise, so only the weights differ."""
        extra = self.strategy.apply(weights, args.num_inference_steps)
        with torch.no_grad():
            return self.pipe(prompt=args.prompt, **pipeline_call_kwargs(args), **extra).images[0]


def pipeline_call_kwargs(args) -> dict:
    """The pipeline keywords of the rendering flags (everything but the prompt); a fresh seeded generator each call."""
    kwargs = dict(num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                  generator=torch.Generator(device="cpu").manual_seed(args.seed))
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.max_sequence_length:
        kwargs["max_sequence_length"] = args.max_sequence_length
    return kwargs


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


def render_grid(args) -> list[Path]:
    """The published inference scripts: render ``inference_s{s:.2f}_c{c:.2f}.png`` for every weight pair + ``grid.png``."""
    style_weights = parse_weights(args.style_weights, "--style_weights")
    content_weights = parse_weights(args.content_weights, "--content_weights")
    check_render_arguments(args)
    adapters = [load_adapter(args.style_lora_path), load_adapter(args.content_lora_path)]
    out = Path(args.output_dir)
    names = {(s, c): out / f"inference_s{s:.2f}_c{c:.2f}.png" for c in content_weights for s in style_weights}

    def check_outputs():
        check_writable(out, "--output_dir", 2 * png_estimate(args, len(names)))  # the images, then the grid of them
        refuse_existing([*names.values(), out / "grid.png", out / MANIFEST], args.overwrite)

    merged = MergedPipeline(args.model_path, adapters, args.residual_path, args, strategy=args.merge_strategy,
                            roles=(1, 0), check_outputs=check_outputs)
    images = {}
    for c in tqdm(content_weights, desc="content weights"):
        for s in style_weights:
            images[(s, c)] = merged.render([s, c], args)
    written, records = [], []
    for (s, c), image in images.items():
        written.append(save_image(image, names[(s, c)]))
        records.append(ImageRecord(file=names[(s, c)].name, prompt=args.prompt, strategy=args.merge_strategy,
                                   method=adapters_method(adapters), style_weight=s, content_weight=c, seed=args.seed))
    written.append(save_image(label_grid(images, style_weights, content_weights), out / "grid.png"))
    written.append(write_manifest(out, records))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return written


def merge_adapters(args) -> Path | None:
    """``python -m qrlora.merge``: any adapters, one weight each; render a prompt and/or save the merged denoiser."""
    check_render_arguments(args)
    weights = parse_weights(args.weights, "--weights") if args.weights else [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise UserError(f"--weights: {len(weights)} weights for {len(args.adapters)} adapters")
    adapters = [load_adapter(a) for a in args.adapters]
    path = Path(args.output_dir) / ("merged_" + "_".join(f"{w:.2f}" for w in weights) + ".png")

    def check_outputs():
        if args.save_merged:
            for adapter in adapters:
                adapter.require_weight_change("--save_merged folds it into the weights", "render it live instead")
            if not STRATEGIES[args.merge_strategy].folds_weights:
                raise UserError(f"--save_merged: --merge_strategy {args.merge_strategy} switches adapters per step; "
                                "it has no single merged weight")
            saved = Path(args.save_merged)
            if saved.exists() and (not saved.is_dir() or any(saved.iterdir())) and not args.overwrite:
                raise UserError(f"--save_merged: {saved} exists and is not an empty folder; choose a new folder or pass --overwrite")
            check_writable(saved.parent, "--save_merged", merged_size_estimate(args.model_path))
        if not args.no_render:
            check_writable(path.parent, "--output_dir", png_estimate(args, 1))
            refuse_existing([path], args.overwrite)

    # ZipLoRA and K-LoRA take --adapters CONTENT STYLE.
    merged = MergedPipeline(args.model_path, adapters, args.residual_path, args, strategy=args.merge_strategy,
                            roles=(0, 1), check_outputs=check_outputs)
    if args.save_merged:
        merged.merger.merge(weights)
        with atomic_output(args.save_merged, folder=True) as folder:  # a full disk leaves no half-written model
            merged.denoiser.save_pretrained(folder)
        print(f"saved the merged {merged.backbone.denoiser_name} to {args.save_merged}")
    if args.no_render:
        return None
    save_image(merged.render(weights, args), path)
    print(f"wrote {path}")
    return path
