"""The paper's comparison, its parts: render every merge strategy at the chosen weights, score, tabulate, plot (the
command, ``python -m qrlora.compare``, is ``qrlora.cli.compare``).

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

from ..errors import UserError
from ..files.checkpoint import save_adapter
from ..merging.inference import MergedPipeline, adapters_method
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from .evaluate import ImageRecord, ScoringSettings, load_model, write_manifest


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


def check_scoring_models(scoring: ScoringSettings) -> None:
    """Fail before rendering when a scoring model cannot be found (reads its config only)."""
    from transformers import AutoConfig

    load_model("--clip_model", scoring.clip_model, AutoConfig.from_pretrained)
    load_model("--dino_model", scoring.dino_model, AutoConfig.from_pretrained)


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
