"""Find the training runs the wrappers wrote, so merge and analysis wrappers need no paths.

The training wrappers write ``exps_SD3/<date-time>-<s|c>-<rank>-<method>``, ``exps_flux/<date-time>-<s|c>-<rank>``
and ``exps_SDXL/...`` under the folder they were started from, each with a copy of the wrapper
(``train_*_sty.sh`` / ``train_*_cnt.sh``). A run is finished when its ``pytorch_lora_weights.safetensors`` exists;
its backbone, method, rank and base model come from that file's metadata, its task (style or content) from the
folder name's ``s`` / ``c`` trigger or the wrapper copy.

    python -m qrlora.runs pair [--backbone B] [--static | --methods M,...] [--roots DIR ...]
    python -m qrlora.runs latest [--backbone B] [--methods M,...] [--roots DIR ...]
    python -m qrlora.runs model --adapter FILE

print shell assignments (``FOUND_STYLE_LORA=...``) for ``scripts/find_runs.sh``, and on stderr which runs they chose.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from safetensors import safe_open

from .checkpoint import ADAPTER_FILENAME
from ..core.methods import METHODS

TASKS = {"s": "style", "c": "content"}
RUN_NAME = re.compile(r"\d{8}-\d{6}-(?P<trigger>[sc])-\d+(-.+)?")
WRAPPER_TASK = re.compile(r"train_.+_(?P<task>sty|cnt)\.sh")


@dataclass(frozen=True)
class Run:
    """One finished training run folder and what its adapter file says about itself."""

    folder: Path
    task: str  # "style" or "content"
    backbone: str
    method: str
    rank: int
    base_model: str
    mtime: float

    @property
    def adapter(self) -> Path:
        return self.folder / ADAPTER_FILENAME

    def describe(self) -> str:
        return f"{self.folder} ({self.task}, {self.backbone} {self.method} rank {self.rank})"


def _task_of(folder: Path) -> str | None:
    named = RUN_NAME.fullmatch(folder.name)
    if named:
        return TASKS[named["trigger"]]
    for wrapper in folder.glob("train_*.sh"):
        found = WRAPPER_TASK.fullmatch(wrapper.name)
        if found:
            return "style" if found["task"] == "sty" else "content"
    return None


def _base_model(recorded: str, folder: Path) -> str:
    """The base model as recorded; a relative local path is resolved from where the run was started."""
    if not recorded or Path(recorded).is_absolute() or Path(recorded).exists():
        return recorded
    started_from = folder.parent.parent  # <start folder>/exps_*/<run>
    return str(started_from / recorded) if (started_from / recorded).exists() else recorded


def find_runs(roots: Iterable[str | Path]) -> list[Run]:
    """Every finished run under ``<root>/exps_*/`` for each root (duplicates and unreadable files skipped)."""
    runs, seen = [], set()
    for root in roots:
        for adapter in sorted(Path(root).glob(f"exps_*/*/{ADAPTER_FILENAME}")):
            folder = adapter.parent
            if folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            task = _task_of(folder)
            try:
                with safe_open(str(adapter), framework="pt") as handle:
                    meta = handle.metadata() or {}
            except Exception:  # a truncated or foreign file is not a run; the merge would say why if chosen
                continue
            if task is None or not meta.get("method"):
                continue
            runs.append(Run(folder, task, meta.get("backbone", ""), meta["method"], int(meta.get("rank", 0)),
                            _base_model(meta.get("base_model", ""), folder), adapter.stat().st_mtime))
    return runs


def _filtered(runs: Sequence[Run], backbone: str | None, methods: Sequence[str] | None, static: bool) -> list[Run]:
    return [r for r in runs
            if (backbone is None or r.backbone == backbone)
            and (not methods or r.method in methods)
            and (not static or (r.method in METHODS and METHODS[r.method].static))]


def newest_pair(runs: Sequence[Run]) -> tuple[Run, Run] | None:
    """The newest style run and newest content run of one backbone, method, rank and base model (the group
    whose newer run is the most recent), or None when no group has both."""
    groups: dict[tuple, dict[str, Run]] = {}
    for run in sorted(runs, key=lambda r: r.mtime):
        groups.setdefault((run.backbone, run.method, run.rank, run.base_model), {})[run.task] = run
    pairs = [(g["style"], g["content"]) for g in groups.values() if len(g) == 2]
    return max(pairs, key=lambda pair: max(r.mtime for r in pair), default=None)


def _where(roots: Sequence[str], backbone: str | None, methods: Sequence[str] | None, static: bool) -> str:
    what = " ".join(filter(None, [backbone, ",".join(methods or []) or ("static-method" if static else "")]))
    return f"{what + ' ' if what else ''}runs under " + ", ".join(f"{Path(r)}/exps_*" for r in roots)


def _assign(name: str, value: str) -> str:
    return f"{name}={shlex.quote(value)}"
