"""Merge CLIs: ``python -m qrlora.merge`` / ``qrlora-merge`` (``merge_main``: any adapters, one weight each) and the
published weight-grid scripts / ``qrlora-grid`` (``grid_main``: a style and a content adapter over a weight grid).
The command bodies (``render_grid``, ``merge_adapters``) turn the flags into typed settings once and drive
``qrlora.merging.inference.MergedPipeline``."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import cli_entry
from ..errors import UserError
from ..evaluation.evaluate import MANIFEST, ImageRecord, write_manifest
from ..files.checkpoint import load_adapter
from ..files.outputs import check_writable, refuse_existing
from ..merging.inference import (MergedPipeline, adapters_method, label_grid, merged_size_estimate, parse_weights,
                                save_image)
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from .arguments import (ArgumentParser, add_render_arguments, add_strategy_arguments, number_list, settings_from)


def grid_parser(description: str, backbone_default_steps: int = 28) -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument("--style_lora_path", required=True, help="the style adapter file (columns of the grid)")
    p.add_argument("--content_lora_path", required=True, help="the content adapter file (rows of the grid)")
    p.add_argument("--residual_path", help="residual file: merge in residual form (default: delta form, no file needed)")
    p.add_argument("--style_weights", type=number_list, default="0.0,0.5,1.0", help="comma list")
    p.add_argument("--content_weights", type=number_list, default="0.0,0.5,1.0", help="comma list")
    add_strategy_arguments(p)
    add_render_arguments(p, backbone_default_steps)
    return p


@cli_entry
def grid_main(argv=None, description: str = "Merge a style and a content adapter over a grid of weights.") -> list[Path]:
    """The published inference scripts: render ``inference_s{s:.2f}_c{c:.2f}.png`` for every weight pair + ``grid.png``."""
    return render_grid(grid_parser(description).parse_args(argv))


def merge_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m qrlora.merge", description=merge_main.__doc__)
    p.add_argument("--model_path", required=True, help="diffusers pipeline folder or hub id of the base model")
    p.add_argument("--adapters", nargs="+", required=True, help="adapter files (static methods mixed; MoE live)")
    p.add_argument("--weights", type=number_list, help="comma list, one per adapter (default: all 1.0); negative weights work: --weights -1,2")
    p.add_argument("--residual_path", help="merge in residual form (adapters must share Q and R; default: delta form, no file needed)")
    p.add_argument("--save_merged", help="write the merged denoiser here in the diffusers layout (static adapters only; default: not saved)")
    p.add_argument("--no_render", action="store_true", help="skip rendering the prompt")
    add_strategy_arguments(p)
    add_render_arguments(p)
    return p


@cli_entry
def merge_main(argv=None) -> Path | None:
    """``python -m qrlora.merge``: any adapters, one weight each; render a prompt and/or save the merged denoiser."""
    return merge_adapters(merge_parser().parse_args(argv))


def render_grid(args: argparse.Namespace) -> list[Path]:
    """The published inference scripts: render ``inference_s{s:.2f}_c{c:.2f}.png`` for every weight pair + ``grid.png``."""
    style_weights = parse_weights(args.style_weights, "--style_weights")
    content_weights = parse_weights(args.content_weights, "--content_weights")
    render, settings = settings_from(RenderSettings, args), settings_from(StrategySettings, args)
    adapters = [load_adapter(args.style_lora_path), load_adapter(args.content_lora_path)]
    out = Path(args.output_dir)
    names = {(s, c): out / f"inference_s{s:.2f}_c{c:.2f}.png" for c in content_weights for s in style_weights}

    def check_outputs():
        check_writable(out, "--output_dir", 2 * render.png_bytes(len(names)))  # the images, then the grid of them
        refuse_existing([*names.values(), out / "grid.png", out / MANIFEST], args.overwrite)

    merged = MergedPipeline(args.model_path, adapters, args.residual_path, render, strategy=args.merge_strategy,
                            roles=(1, 0), check_outputs=check_outputs, settings=settings)
    images = {}
    for c in tqdm(content_weights, desc="content weights"):
        for s in style_weights:
            images[(s, c)] = merged.render([s, c])
    written, records = [], []
    for (s, c), image in images.items():
        written.append(save_image(image, names[(s, c)]))
        records.append(ImageRecord(file=names[(s, c)].name, prompt=args.prompt, strategy=args.merge_strategy,
                                   method=adapters_method(adapters), style_weight=s, content_weight=c, seed=args.seed))
    written.append(save_image(label_grid(images, style_weights, content_weights), out / "grid.png"))
    written.append(write_manifest(out, records))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return written


def merge_adapters(args: argparse.Namespace) -> Path | None:
    """``python -m qrlora.merge``: any adapters, one weight each; render a prompt and/or save the merged denoiser."""
    render, settings = settings_from(RenderSettings, args), settings_from(StrategySettings, args)
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
            check_writable(path.parent, "--output_dir", render.png_bytes(1))
            refuse_existing([path], args.overwrite)

    # ZipLoRA and K-LoRA take --adapters CONTENT STYLE.
    merged = MergedPipeline(args.model_path, adapters, args.residual_path, render, strategy=args.merge_strategy,
                            roles=(0, 1), check_outputs=check_outputs, settings=settings)
    if args.save_merged:
        merged.save_merged(weights, args.save_merged)
        print(f"saved the merged {merged.backbone.denoiser_name} to {args.save_merged}")
    if args.no_render:
        return None
    save_image(merged.render(weights), path)
    print(f"wrote {path}")
    return path
