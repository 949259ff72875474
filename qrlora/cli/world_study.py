"""``python -m qrlora.world study``: the disentanglement study's run (docs/world.md, "Does QR-LoRA disentangle?").

Per (condition, seed) of ``qrlora.toy.world.study.CONDITIONS``: train the content and the style adapter through the real
trainer (``qrlora.cli.world_runs.train_adapter``; conditions that differ only in the merge share one trained pair), merge
them through the real ``MergedPipeline`` with the condition's strategy on the weight grid, score every cell with the
world's classifier, measure the mechanism, and write ``cell.json`` last (atomically). A study that stops is
resumed by running the same command: finished pairs and cells are read back, never redone.

Layout of ``--output``::

    .qrlora-study.lock              held (flock) by the one study writing here: a second one is refused
    study.json                      the study's settings (a resumed study must match them)
    pairs/<method>-<digest>/seedN/  content/ and style/ training runs, pair.json when both finished (its paths
                                    relative to the study folder, so a copied or moved study reads its own files)
    cells/<condition>/seedN.json    one finished (condition, seed)
    world_study.{json,md,png}       the report (also written to --report_dir)

Every file it reads back may be damaged (truncated, empty, of the wrong type, edited): a damaged pair record or
cell is said in one line and recomputed; a damaged ``study.json`` is one error line naming it. ``--jobs`` workers
die with the study (``qrlora.lifeline``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from ..errors import UserError
from ..files.outputs import atomic_output
from ..files.run_folder import RunLock
from ..lifeline import die_with_parent
from ..toy.world import data
from ..toy.world.study import (CONDITIONS, STYLE_SEED_OFFSET, WEIGHT_GRID, StudyPlan, aggregate, markdown,
                               pair_folder_name, plot, token_mechanism, weight_mechanism, word_positions)
from ..toy.world.world import CONTENT_STYLE, STYLE_SHAPE, load_world
from .world_runs import render_settings, train_adapter

STUDY_FILE = "study.json"
STUDY_LOCK = ".qrlora-study.lock"
REPORT_NAME = "world_study"
ROLES = ("content", "style")
CELL_COUNTS = ("own_content", "own_style", "content_alone_merged_prompt", "style_alone_merged_prompt")
logger = logging.getLogger("qrlora.study")


class StudyLock(RunLock):
    """One writer per study folder (``flock``, dropped by the kernel when the holder dies, even on SIGKILL)."""

    lock_name = STUDY_LOCK

    def in_use(self, holder: str) -> str:
        return (f"--output {self.path.parent} is in use by another study (pid {holder}); wait for it to finish "
                "or choose another --output")


def _write_json(path: Path, value) -> None:
    """Write JSON atomically: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _load_json(path: Path):
    """The JSON value in ``path``; ``ValueError`` when it is not JSON (truncated, empty, not UTF-8)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(str(err)) from None


def _worker_init(parent: int) -> None:
    """Each ``--jobs`` worker: dies with the study, says third-party notices as the command does, one thread."""
    from .. import quiet

    die_with_parent(parent)
    quiet.install()  # spawned workers start afresh: the CLI's filter (torchvision notice, ...) is not inherited
    torch.set_num_threads(1)  # --jobs processes share the cores: one BLAS thread each is fastest on tiny models


def _recorded_path(output: Path, text: str) -> Path:
    """A path ``pair.json`` recorded, on this machine: relative to the study folder (this version), or an absolute
    path of an older version, re-rooted at its ``pairs/`` part so a copied study never reads the original's files."""
    path = Path(text)
    if not path.is_absolute():
        return output / path
    parts = path.parts
    if "pairs" not in parts:
        raise ValueError(f"{text} is outside the study")
    return output.joinpath(*parts[len(parts) - 1 - parts[::-1].index("pairs"):])


def read_pair(folder: Path, output: Path) -> dict | None:
    """The finished pair recorded in ``folder/pair.json`` with its paths on this machine, or None when there is
    none; a damaged record (truncated, wrong type, a missing adapter file) is said in one line and taken as none."""
    done = folder / "pair.json"
    if not done.exists():
        return None
    try:
        record = _load_json(done)
        paths = {role: _recorded_path(output, record["paths"][role]) for role in ROLES}
        seeds = {role: record["seeds"][role] for role in ROLES}
        seconds = float(record["seconds"])
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ValueError(f"its adapter {missing[0]} is missing")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in seeds.values()):
            raise TypeError("seeds are not integers")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        logger.warning("%s is damaged (%s); training this pair again", done, str(err) or type(err).__name__)
        return None
    return {"paths": {role: str(p) for role, p in paths.items()}, "seeds": seeds, "seconds": seconds}


def read_cell(path: Path, name: str, seed: int, samples: int, grid: tuple[float, ...], say: bool = True) -> dict | None:
    """The finished cell in ``path``, or None when there is none; a damaged one (truncated, empty, of the wrong
    type, another grid or sample count) is said in one line (``say``) and taken as none, so it is recomputed."""
    if not path.exists():
        return None
    expected = sorted((wc, ws) for wc in grid for ws in grid)
    try:
        cell = _load_json(path)
        problem = None
        if not isinstance(cell, dict):
            problem = f"a JSON {type(cell).__name__}, not a cell"
        elif (cell.get("condition"), cell.get("seed"), cell.get("samples")) != (name, seed, samples):
            problem = "another condition, seed or sample count"
        elif sorted((g["content_weight"], g["style_weight"]) for g in cell["grid"]) != expected:
            problem = "its grid is not the study's"
        elif not all(isinstance(g[k], int) and 0 <= g[k] <= samples for g in cell["grid"]
                     for k in ("content", "style", "both")) \
                or not all(isinstance(cell[k], int) for k in CELL_COUNTS) \
                or not isinstance(cell["seconds"], (int, float)) or not isinstance(cell.get("mechanism", {}), dict):
            problem = "counts missing or of the wrong type"
    except ValueError:
        problem = "not JSON: truncated or empty"
    except (KeyError, TypeError, AttributeError):
        problem = "entries missing or of the wrong type"
    if problem:
        if say:
            logger.warning("%s is damaged (%s); computing this cell again", path, problem)
        return None
    return cell


def train_pair(world_path: str, name: str, seed: int, output: str, steps: int | None = None) -> dict:
    """Train (or read back) the content and style adapters of ``CONDITIONS[name]`` at ``seed``; their files.

    ``steps`` overrides the condition's trainer steps (the tests run every condition for one step)."""
    condition = CONDITIONS[name]
    output = Path(output)
    folder = output / "pairs" / pair_folder_name(condition, seed)
    done = folder / "pair.json"
    record = read_pair(folder, output)
    if record is not None:
        return record
    if folder.exists():  # an interrupted training: its run folders are incomplete
        for role in ROLES:  # the study lock keeps other studies out; a training run started by hand is refused too
            if (folder / role / "run").is_dir():
                RunLock(folder / role / "run").acquire().release()
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
            if condition.sequential:  # trained on top of the content adapter, merged in live and frozen
                overrides["base_adapter"] = str(paths["content"])
        paths[role] = str(train_adapter(world, condition.method, role, folder / role, steps=steps or condition.steps,
                                        lr=condition.learning_rate, rank=condition.rank or world.flux_ratio_rank,
                                        seed=seeds[role],
                                        overrides=overrides))
    record = {"paths": {role: os.path.relpath(p, output) for role, p in paths.items()}, "seeds": seeds,
              "seconds": round(time.perf_counter() - start, 1)}
    _write_json(done, record)  # the paths relative to the study folder: a copied or moved study reads its own
    return {**record, "paths": paths}


def run_cell(world_path: str, name: str, seed: int, output: str, samples: int, grid: tuple[float, ...] = WEIGHT_GRID,
             steps: int | None = None) -> dict:
    """One (condition, seed): merge the pair on the ``grid`` (every (content, style) pair of its weights), score
    it, measure the mechanism; write ``cells/<name>/seedN.json``."""
    from ..files.checkpoint import load_adapter
    from ..merging.inference import MergedPipeline
    from ..toy.world.experiment import Sampler
    path = Path(output) / "cells" / name / f"seed{seed}.json"
    cell = read_cell(path, name, seed, samples, tuple(grid))
    if cell is not None:
        return cell
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
    return ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))


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
    if not grid or 1.0 not in grid:
        raise UserError(f"the weight grid {list(grid)} must hold 1.0 (the headline cell (1, 1))")
    if Path(report_name).name != report_name or report_name.startswith("."):
        raise UserError(f"--report_name {report_name!r} must be a plain file name (the report goes to --output)")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output: {output} is a file, not a folder")
    settings = {"world": str(world.path), "samples": samples, "grid": list(grid), "steps_override": steps}
    recorded = output / STUDY_FILE
    lock = StudyLock(output).acquire()  # one writer: a second study on this folder stops here, nothing touched
    try:
        if recorded.exists():
            try:
                previous = _load_json(recorded)
            except ValueError:
                previous = None
            if not isinstance(previous, dict):
                raise UserError(f"--output: {recorded} is damaged (not a study record: truncated or edited); "
                                "restore it or choose a new --output")
            if previous != settings:
                raise UserError(f"--output: {output} holds a study with other settings ({previous}); "
                                "use a new folder or the same --world / --samples")
        elif any(p.name != STUDY_LOCK for p in output.iterdir()):
            raise UserError(f"--output: {output} is not empty and holds no {STUDY_FILE}; choose a new folder")
        _write_json(recorded, settings)
        return _run_locked(world, world_path, output, names, seeds, jobs=jobs, samples=samples, command=command,
                           report_dir=report_dir, report_name=report_name, grid=grid, steps=steps,
                           settings=settings)
    finally:
        lock.release()


def _run_locked(world, world_path, output: Path, names, seeds, *, jobs, samples, command, report_dir, report_name,
                grid, steps, settings) -> dict:
    """The study itself, with the study folder locked."""

    plan = StudyPlan([CONDITIONS[n] for n in names], {n: CONDITIONS[n].seeds(seeds) for n in names})
    start = time.perf_counter()
    # Pairs first (conditions that only merge differently share one), then the cells that read them.
    _run_all(train_pair, [(str(world.path), c.name, s, str(output), steps) for c, s in plan.pairs()
                          if read_cell(output / "cells" / c.name / f"seed{s}.json", c.name, s, samples, tuple(grid),
                                       say=False) is None], jobs, "training pairs")
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
        with atomic_output(folder / f"{report_name}.md") as tmp:  # a reader sees the old report or the new one
            tmp.write_text(markdown(report))
        with atomic_output(folder / f"{report_name}.png") as tmp:
            plot(report, tmp)
    return report
