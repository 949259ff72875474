"""Shared helpers of the benchmarks: published model configs, target counting, timing, machine info, output.

Every bench script prints a markdown table and writes a JSON file (default ``bench/results/<name>.json``,
gitignored; ``--output`` overrides). Speed claims are ratios measured in one run, side by side, against what a
user would otherwise use; each JSON records the machine, the date, the load average and the command line, so
a number is never separated from where it was measured.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# --------------------------------------------------------------------------------------------------------
# Published configs: the denoisers' are the backbone registry's (``Backbone.published_config``, one owner); the
# FLUX VAE's (vae/config.json) only the GPU bench uses
# --------------------------------------------------------------------------------------------------------
FLUX_VAE_CONFIG = dict(  # black-forest-labs/FLUX.1-dev, vae/config.json
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
def published_config(kind: str) -> dict:
    """The published full-size denoiser config of ``kind`` (a copy of the backbone registry's)."""
    from qrlora.backbones import BACKBONES

    return dict(BACKBONES[kind].published_config)


def default_targets(kind: str) -> list[str]:
    """The targets the ``kind`` wrappers train: the backbone registry's own default set (one owner)."""
    from qrlora.backbones import BACKBONES

    return list(BACKBONES[kind].default_targets)


# FLUX's set: attention of both streams + both feed-forwards; suffix-matched like PEFT, so in FLUX's single
# blocks only attn.to_q/k/v match.
DEFAULT_TARGETS = default_targets("flux")
FLUX_DEV_CONFIG = published_config("flux")
SD3_MEDIUM_CONFIG = published_config("sd3")


def build_on_meta(kind: str, **overrides):
    """The FLUX.1-dev (``kind='flux'``) or SD3-medium (``'sd3'``) transformer with no storage (meta device)."""
    from qrlora.backbones import BACKBONES

    return BACKBONES[kind].meta_denoiser(**overrides)


def count_target_shapes(kind: str, targets: Sequence[str] | None = None) -> dict[tuple[int, int], int]:
    """``{(out, in): number of targeted Linears}`` of the real model, counted on the meta device (not guessed);
    ``targets`` default to that backbone's own default set."""
    from qrlora.core.inject import find_target_modules

    model = build_on_meta(kind)
    paths = find_target_modules(model, targets or default_targets(kind))
    return dict(Counter(tuple(model.get_submodule(p).weight.shape) for p in paths))


# --------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> tuple[float, object]:
    """Wall time of one call of ``fn`` (after ``sync`` on both sides for asynchronous devices) and its result."""
    if sync:
        sync()
    start = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - start, out


def other_runnable_tasks() -> int | None:
    """Tasks other than the reader that are runnable right now (Linux ``/proc/loadavg`` field 4), or None."""
    try:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
        return max(running - 1, 0)
    except (OSError, ValueError, IndexError):
        return None


class IdleGate:
    """Before each timed run, wait (at most ``max_wait`` s) until no other task has been runnable for a moment.

    On a shared machine, other processes competing for the cores slow down LAPACK's barrier-heavy routines by
    up to 10x (threads spin at barriers while their partner is descheduled), which turns single timings into
    noise. Waiting for an idle moment and taking the best of N keeps ratios meaningful; on a dedicated machine
    this never waits. ``busy_starts`` counts timed runs that started with other tasks still runnable.
    """

    def __init__(self, max_wait: float, settle: int = 3, poll: float = 0.2):
        self.max_wait, self.settle, self.poll = float(max_wait), settle, poll
        self.waited = 0.0
        self.runs = 0
        self.busy_starts = 0

    def __call__(self) -> bool:
        self.runs += 1
        if self.max_wait <= 0 or other_runnable_tasks() is None:
            return True
        start, quiet = time.perf_counter(), 0
        while quiet < self.settle:
            if time.perf_counter() - start > self.max_wait:
                break
            quiet = quiet + 1 if other_runnable_tasks() == 0 else 0
            if quiet < self.settle:
                time.sleep(self.poll)
        self.waited += time.perf_counter() - start
        idle = quiet >= self.settle
        self.busy_starts += 0 if idle else 1
        return idle

    def report(self) -> dict:
        return {"max_wait_s": self.max_wait, "timed_runs": self.runs, "busy_starts": self.busy_starts,
                "seconds_waited": round(self.waited, 1)}


def median(values: Iterable[float]) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident set size now (Linux ``/proc``; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def _cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, with family / model numbers (virtual machines often say just "AMD EPYC")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def command_name() -> str:
    """How the running bench was started: ``-m bench.X`` (as docs/benchmarks.md runs them), else the script path as typed."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return f"-m {spec.name}" if spec is not None else Path(sys.argv[0]).as_posix()


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, threads, memory, GPU, library versions, load average."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([command_name()] + sys.argv[1:]),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for mod in ("diffusers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informative only
            info[mod] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------
def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON (atomic rename), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(value, digits: int = 3) -> str:
    """Compact cell text: floats to ``digits`` significant figures, scientific when tiny."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
