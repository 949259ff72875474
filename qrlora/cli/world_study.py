"""``python -m qrlora.world study``: the disentanglement study's run (README "Does QR-LoRA disentangle?").

Per (condition, seed) of ``qrlora.toy.world.study.CONDITIONS``: train the content and the style adapter through the real
trainer (``qrlora.cli.world_runs.train_adapter``; conditions that differ only in the merge share one trained pair), merge
them through the real ``MergedPipeline`` with the condition's strategy on the weight grid, score every cell with the
world's classifier, measure the mechanism, and write ``cell.json`` last (atomically). A study that stops is
resumed by running the same command: finished pairs and cells are read back, never redone.

Layout of ``--output``::

    study.json                      the study's settings (a resumed study must match them)
    pairs/<method>-<digest>/seedN/  content/ and style/ training runs, pair.json when both finished
    cells/<condition>/seedN.json    one finished (condition, seed)
    world_study.{json,md,png}       the report (also written to --report_dir)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from ..errors import UserError
from ..toy.world import data
from ..toy.world.study import (CONDITIONS, STYLE_SEED_OFFSET, WEIGHT_GRID, StudyPlan, aggregate, markdown,
                               pair_folder_name, plot, token_mechanism, weight_mechanism, word_positions)
from ..toy.world.world import CONTENT_STYLE, STYLE_SHAPE, load_world
from .world_runs import render_settings, train_adapter

STUDY_FILE = "study.json"
REPORT_NAME = "world_study"


def _write_json(path: Path, value) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _threads_per_job() -> None:
    torch.set_num_threads(1)  # --jobs processes share the cores: one BLAS thread each is fastest on tiny models


def train_pair(world_path: str, name: str, seed: int, output: str, steps: int | None = None) -> dict:
    """Train (or read back) the content and style adapters of ``CONDITIONS[name]`` at ``seed``; their files.

    ``steps`` overrides the condition's trainer steps (the tests run every condition for one step)."""
    condition = CONDITIONS[name]
    folder = Path(output) / "pairs" / pair_folder_name(condition, seed)
    done = folder / "pair.json"
    if done.exists():
        return json.loads(done.read_text())
    if folder.exists():  # an interrupted training: its run folders are incomplete
        shutil.rmtree(folder)
    world = load_world(world_path)
    seeds = {"content": seed, "style": seed if condition.shared_seed else seed + STYLE_SEED_OFFSET}
    start = time.perf_counter()
    paths = {}
    for role in ("content", "style"):
        overrides = {"train_batch_size": condition.batch_size, "gradient_accumulation_steps": condition.accumulation,
                     **dict(condition.overrides)}
        if condition.targets:
            overrides["lora_layers"] = ",".join(condition.targets)
        if role == "style":
            overrides.update(condition.style_overrides)
        paths[role] = str(train_adapter(world, condition.method, role, folder / role, steps=steps or condition.steps,
                                        lr=condition.learning_rate, rank=condition.rank or world.flux_ratio_rank,
                                        seed=seeds[role],
                                        overrides=overrides))
    record = {"paths": paths, "seeds": seeds, "seconds": round(time.perf_counter() - start, 1)}
    _write_json(done, record)
    return record


def run_cell(world_path: str, name: str, seed: int, output: str, samples: int, grid: tuple[float, ...] = WEIGHT_GRID,
             steps: int | None = None) -> dict:
    """One (condition, seed): merge the pair on the ``grid`` (every (content, style) pair of its weights), score
    it, measure the mechanism; write ``cells/<name>/seedN.json``."""
    from ..files.checkpoint import load_adapter
    from ..merging.inference import MergedPipeline
    from ..toy.world.experiment import Sampler
    path = Path(output) / "cells" / name / f"seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    condition = CONDITIONS[name]
    start = time.perf_counter()
    pair = train_pair(world_path, name, seed, output, steps)
    world = load_world(world_path)
    adapters = [load_adapter(pair["paths"]["content"]), load_adapter(pair["paths"]["style"])]
    render = render_settings(world, 0)

    direct = Sampler(world, MergedPipeline(str(world.path), adapters, None, render, strategy="direct"), samples)
    own_content = world.rates(direct.images((1.0, 0.0), [data.caption(world.new_shape, CONTENT_STYLE)]),
                              shape=world.new_shape)["shape"]
    own_style = world.rates(direct.images((0.0, 1.0), [data.caption(STYLE_SHAPE, world.new_style)]),
                            style=world.new_style)["style"]
    # Each adapter alone on the merged prompt: does the failure come from summing two adapters, or does one
    # adapter already lose its attribute when the prompt's other word is new?
    merged_prompt = [data.caption(world.new_shape, world.new_style)]
    content_alone = world.rates(direct.images((1.0, 0.0), merged_prompt), shape=world.new_shape)["shape"]
    style_alone = world.rates(direct.images((0.0, 1.0), merged_prompt), style=world.new_style)["style"]
    merged = direct if condition.merge == "direct" else Sampler(
        world, MergedPipeline(str(world.path), adapters, None, render, strategy=condition.merge), samples)
    cells = []
    for wc in grid:
        for ws in grid:
            cell = merged.cell((wc, ws))
            cells.append({"content_weight": wc, "style_weight": ws,
                          **{k: round(cell[f"{k}_accuracy" if k != "both" else "both_correct"] * samples)
                             for k in ("content", "style", "both")}})
    direct.merged.merger.restore()
    mechanism = mechanism_of(direct.merged.pipe, world, adapters)
    result = {"condition": name, "seed": seed, "samples": samples, "pair_seeds": pair["seeds"], "grid": cells,
              "own_content": round(own_content * samples), "own_style": round(own_style * samples),
              "content_alone_merged_prompt": round(content_alone * samples),
              "style_alone_merged_prompt": round(style_alone * samples),
              "mechanism": mechanism, "training_seconds": pair["seconds"],
              "seconds": round(time.perf_counter() - start + pair["seconds"], 1)}
    _write_json(path, result)
    return result


@torch.no_grad()
def mechanism_of(pipe, world, adapters) -> dict:
    """``weight_mechanism`` and ``token_mechanism`` of a content/style pair on the world's merged prompt, from
    one forward pass of the base denoiser at sigma 0.5 (hooks record each adapted Linear's input)."""
    from ..backbones import BACKBONES

    content, style = adapters
    denoiser = pipe.transformer
    layers = sorted(set(content.layers) & set(style.layers))
    weights = {p: denoiser.get_submodule(p).weight.detach().float().cpu() for p in layers}
    out = weight_mechanism(content, style, weights)

    prompt = data.caption(world.new_shape, world.new_style)
    cond = BACKBONES["sd3"].encode_prompts(pipe, [prompt], "cpu", world.max_sequence_length)
    embeds = cond["prompt_embeds"]  # (1, clip + t5 tokens, width)
    clip_length = pipe.tokenizer.model_max_length

    def clip_ids(text):
        return pipe.tokenizer(text, padding="max_length", max_length=clip_length, truncation=True).input_ids

    def t5_ids(text):
        return pipe.tokenizer_3(text, padding="max_length", max_length=world.max_sequence_length,
                                truncation=True).input_ids

    def positions(word, replacement):
        return (word_positions(clip_ids, prompt, word, replacement)
                + [clip_length + i for i in word_positions(t5_ids, prompt, word, replacement)])

    content_word = positions(world.new_shape, STYLE_SHAPE)
    style_word = positions(world.new_style, CONTENT_STYLE)
    rest = [i for i in range(embeds.shape[1]) if i not in content_word and i not in style_word]
    groups = {"content_word": content_word, "style_word": style_word, "rest": rest}

    inputs, hooks = {}, []
    for p in layers:
        hooks.append(denoiser.get_submodule(p).register_forward_pre_hook(
            lambda module, args, p=p: inputs.__setitem__(p, args[0][0].detach().float())))
    try:
        size = world.resolution // pipe.vae_scale_factor
        latent = torch.randn(1, denoiser.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        denoiser(hidden_states=latent, timestep=torch.tensor([500.0]), encoder_hidden_states=embeds,
                 pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    out.update(token_mechanism(inputs, content, style, weights, groups, context_length=embeds.shape[1]))
    return out


def _pool(jobs: int):
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_threads_per_job)


def _run_all(function, calls: list[tuple], jobs: int, desc: str) -> list:
    """``function(*call)`` for every call, ``jobs`` processes at a time (inline for one), with a progress bar."""
    from tqdm.auto import tqdm

    if not calls:
        return []
    if jobs == 1:
        return [function(*c) for c in tqdm(calls, desc=desc)]
    with _pool(jobs) as pool:
        futures = [pool.submit(function, *c) for c in calls]
        return [f.result() for f in tqdm(futures, desc=desc)]


def run_study(world_path: str, output: Path, names: list[str], seeds: list[int] | None, *, jobs: int, samples: int,
              command: str, report_dir: Path | None = None, report_name: str = REPORT_NAME,
              grid: tuple[float, ...] = WEIGHT_GRID, steps: int | None = None) -> dict:
    """Run (or resume) the study; write and return the report. ``grid`` and ``steps`` (an override of every
    condition's trainer steps) exist for the tests; the command uses the declared ones."""
    world = load_world(world_path)
    output = Path(output)
    settings = {"world": str(world.path), "samples": samples, "grid": list(grid), "steps_override": steps}
    recorded = output / STUDY_FILE
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous != settings:
            raise UserError(f"--output: {output} holds a study with other settings ({previous}); "
                            "use a new folder or the same --world / --samples")
    elif output.exists() and any(output.iterdir()):
        raise UserError(f"--output: {output} is not empty and holds no {STUDY_FILE}; choose a new folder")
    _write_json(recorded, settings)

    plan = StudyPlan([CONDITIONS[n] for n in names], {n: CONDITIONS[n].seeds(seeds) for n in names})
    start = time.perf_counter()
    # Pairs first (conditions that only merge differently share one), then the cells that read them.
    _run_all(train_pair, [(str(world.path), c.name, s, str(output), steps) for c, s in plan.pairs()
                          if not (output / "cells" / c.name / f"seed{s}.json").exists()], jobs, "training pairs")
    cells = _run_all(run_cell, [(str(world.path), c.name, s, str(output), samples, tuple(grid), steps)
                                for c, s in plan.cells()], jobs, "merging cells")
    by_name: dict[str, list[dict]] = {}
    for (c, _), cell in zip(plan.cells(), cells):
        by_name.setdefault(c.name, []).append(cell)
    shown = Path(world_path).absolute()  # relative to the working folder when inside it (no machine paths in reports)
    shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
    report = {"command": command, "world": str(shown), "settings": {**settings, "world": str(shown)},
              "prompt": data.caption(world.new_shape, world.new_style),
              "world_width": world.record["settings"]["width"], "world_blocks": world.record["settings"]["layers"],
              "seconds": round(sum(c["seconds"] for c in cells), 1),
              "wall_seconds": round(time.perf_counter() - start, 1),
              "conditions": [aggregate(c, by_name[c.name]) for c in plan.conditions]}
    for folder in filter(None, (output, report_dir)):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{report_name}.json", report)
        (folder / f"{report_name}.md").write_text(markdown(report))
        plot(report, folder / f"{report_name}.png")
    return report
