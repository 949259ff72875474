"""One command for the paper's comparison: render every merge strategy at the chosen weights, score, tabulate, plot.

    python -m qrlora.compare --model_path M --content_lora_path C --style_lora_path S \\
        --content_refs assets/cnt/cat --style_refs assets/sty/swirl_painting --prompt "a photo of a <c> cat in <s> style"

For each strategy (``--strategies``, default all) a pipeline is loaded, the pair merged, and one image rendered per
weight pair and seed into ``OUT/<strategy>/`` with its ``manifest.json`` (ZipLoRA also writes its learned adapter
there); then ``qrlora.evaluation.evaluate`` scores all of them into ``OUT/scores.csv``, ``summary.json``, ``summary.md`` (the
table) and ``tradeoff.png``. Everything that can be checked (adapters, reference folders, scoring models, output
folder) is checked before the first image renders.
"""
from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..files.checkpoint import load_adapter, save_adapter
from ..errors import UserError
from .evaluate import ImageRecord, check_output_dir, evaluate_folders, load_model, load_references, write_manifest
from ..merging.inference import MergedPipeline, adapters_method, parse_weights
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES, check_strategy


def parse_strategies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise UserError(f"--strategies: '{text}' names {unknown[0] if unknown else 'nothing'}; choose from {', '.join(STRATEGIES)}")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--seeds: '{text}' is not a comma-separated list of integers") from None


def check_scoring_models(args) -> None:
    """Fail before rendering when a scoring model cannot be found (reads its config only)."""
    from transformers import AutoConfig

    load_model("--clip_model", args.clip_model, AutoConfig.from_pretrained)
    load_model("--dino_model", args.dino_model, AutoConfig.from_pretrained)


def render_strategy(name: str, adapters, model_path: str, render: RenderSettings, settings: StrategySettings,
                    style_weights, content_weights, seeds, folder: Path) -> None:
    """Render every (style, content, seed) image of one strategy into ``folder`` with its manifest. ZipLoRA learns
    its coefficients from renders with ``render``'s own seed; each image takes its seed from ``seeds``."""
    merged = MergedPipeline(model_path, adapters, None, render, strategy=name, roles=(1, 0), settings=settings)
    folder.mkdir(parents=True, exist_ok=True)
    learned = merged.strategy.learned_adapter()
    if learned is not None:  # ZipLoRA: keep the learned merge as a normal adapter file
        save_adapter(folder / f"{name}_adapter.safetensors", learned)
    records = []
    cells = [(s, c, seed) for c in content_weights for s in style_weights for seed in seeds]
    for s, c, seed in tqdm(cells, desc=name):
        file = f"s{s:.2f}_c{c:.2f}_seed{seed}.png"
        merged.render([s, c], replace(render, seed=seed)).save(folder / file)
        records.append(ImageRecord(file=file, prompt=render.prompt, strategy=name, method=adapters_method(adapters),
                                   style_weight=s, content_weight=c, seed=seed))
    write_manifest(folder, records)
    del merged
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(args, render: RenderSettings, settings: StrategySettings) -> list[Path]:
    """``python -m qrlora.compare`` (flags: ``qrlora.cli.compare``): render each merge strategy of a content and a
    style adapter with ``render`` and ``settings``, then score them (the scoring flags still come as ``args``)."""
    # 1. Check everything before the first render.
    strategies = parse_strategies(args.strategies)
    style_weights = parse_weights(args.style_weights, "--style_weights")
    content_weights = parse_weights(args.content_weights, "--content_weights")
    seeds = parse_seeds(args.seeds)
    adapters = [load_adapter(args.style_lora_path), load_adapter(args.content_lora_path)]
    for name in strategies:
        check_strategy(name, adapters, None)
    load_references(args.content_refs, "--content_refs")
    load_references(args.style_refs, "--style_refs")
    check_scoring_models(args)
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite)
    taken = [name for name in strategies if (out / name).exists() and any((out / name).iterdir())]
    if taken and not args.overwrite:
        raise UserError(f"--output_dir: {out / taken[0]} is not empty; pass --overwrite or choose a new folder")

    # 2. Render each strategy, 3. score all images together.
    render = replace(render, seed=seeds[0])  # ZipLoRA samples its recordings with the first seed
    for name in strategies:
        render_strategy(name, adapters, args.model_path, render, settings, style_weights, content_weights, seeds,
                        out / name)
    written = evaluate_folders([str(out / name) for name in strategies], args, out)
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {', '.join(p.name for p in written)} to {out}")
    return written
