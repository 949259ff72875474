"""A training run's folder (``--output_dir``): one run at a time, checkpoints that are complete or absent.

Layout::

    OUTPUT_DIR/.qrlora-run.lock          held (flock) by the one training run writing here
    OUTPUT_DIR/checkpoint-N/             complete checkpoints only: the adapter file, accelerate's optimizer,
                                         scheduler and RNG state, and CHECKPOINT_MARKER, written last
    OUTPUT_DIR/.checkpoint-N.partial/    a save in progress; renamed to checkpoint-N once complete
    OUTPUT_DIR/pytorch_lora_weights.safetensors   the final adapter (atomic write)

A crash at any moment leaves every ``checkpoint-N`` folder complete (the rename is the commit point), so
``--resume_from_checkpoint latest`` always finds a checkpoint it can resume exactly; older checkpoints are
deleted only after the new one is complete.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError

from .checkpoint import ADAPTER_FILENAME, fingerprint_difference, load_adapter
from ..errors import UserError

logger = logging.getLogger("qrlora.run_folder")

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint_complete.json"
PARTIAL_SUFFIX = ".partial"
LOCK_NAME = ".qrlora-run.lock"
LAUNCHER_ENV = "QRLORA_LAUNCHER"
# Adapter metadata a resumed run must share with its checkpoint (the base model is compared by content, below).
RESUME_KEYS = ("method", "rank", "alpha", "num_experts", "target_modules", "lora_blocks", "backbone", "component")


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    number = folder.name[len(CHECKPOINT_PREFIX):]
    return int(number) if folder.name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` folder in step order, complete or not (folders of older versions have no marker)."""
    folders = [d for d in Path(output_dir).glob(CHECKPOINT_PREFIX + "*") if d.is_dir() and checkpoint_step(d) is not None]
    return sorted(folders, key=checkpoint_step)


def is_complete(folder: Path) -> bool:
    """A checkpoint is complete when its marker, written after every other file, exists."""
    return (folder / CHECKPOINT_MARKER).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    return [d for d in list_checkpoints(output_dir) if is_complete(d)]


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint marked complete cannot be resumed (a damaged marker, a file missing, truncated or empty:
    a disk copy that stopped, a file edited), or None. Cheap: sizes, safetensors headers and zip directories
    (``torch.save`` writes zip archives; a truncated one has lost its directory at the end), no tensor is read."""
    import zipfile

    try:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        files = marker["files"]
        sizes = marker.get("sizes", {})
        if not (isinstance(files, list) and isinstance(sizes, dict)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {CHECKPOINT_MARKER} is damaged"
    for name in files:
        path = folder / str(name)
        if path.is_dir():  # markers of older versions listed accelerate's folders too
            continue
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if name in sizes and sizes[name] != size:
            return f"{name} is truncated ({size} of {sizes[name]} bytes)"
        if size == 0:
            return f"{name} is empty"
        with open(path, "rb") as handle:
            head = handle.read(8)
            if name.endswith(".safetensors"):
                length = int.from_bytes(head, "little") if len(head) == 8 else -1
                try:
                    header = json.loads(handle.read(length)) if 0 < length < size else None
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, AttributeError):
                    return f"{name} is not a readable safetensors file"
                if 8 + length + end != size:
                    return f"{name} is truncated"
        if head.startswith(b"PK\x03\x04"):
            try:
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
            except (zipfile.BadZipFile, OSError, ValueError):
                return f"{name} is truncated (not a whole torch.save archive)"
    return None


def resolve_resume(flag: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuse to write over another run's files.

    ``latest`` takes the newest complete checkpoint and says which one, and which incomplete ones it skipped.
    """
    complete = complete_checkpoints(output_dir)
    if not flag:
        held = [*(d.name for d in list_checkpoints(output_dir)), *([ADAPTER_FILENAME] if (output_dir / ADAPTER_FILENAME).exists() else [])]
        if held:
            raise UserError(f"--output_dir {output_dir} already holds another run's {held[-1]}; pass "
                            "--resume_from_checkpoint latest or choose another --output_dir")
        return None
    if flag == "latest":
        skipped = [d.name for d in list_checkpoints(output_dir) if not is_complete(d)]
        chosen = None
        for candidate in reversed(complete):  # the newest whole one; a damaged one is said and passed over
            problem = checkpoint_problem(candidate)
            if problem is None:
                chosen = candidate
                break
            logger.warning("--resume_from_checkpoint latest: %s is damaged (%s); trying the previous checkpoint",
                           candidate, problem)
        if skipped:
            logger.warning("--resume_from_checkpoint latest: skipped incomplete %s", ", ".join(skipped))
        logger.warning("--resume_from_checkpoint latest: %s", f"resuming from {chosen}" if chosen else
                       f"no complete checkpoint in {output_dir}; starting from step 0")
        return chosen
    path = Path(flag)
    path = path if path.is_dir() else output_dir / path
    if not path.is_dir() or not (path / ADAPTER_FILENAME).is_file():
        raise UserError(f"--resume_from_checkpoint: {flag} is not a checkpoint folder")
    if not is_complete(path):
        raise UserError(f"--resume_from_checkpoint: {path} is incomplete (no {CHECKPOINT_MARKER}; the save was "
                        "interrupted); pass latest to take the newest complete one")
    if problem := checkpoint_problem(path):
        raise UserError(f"--resume_from_checkpoint: {path} is damaged ({problem}); pass latest to take the newest "
                        "whole one, or restore it")
    return path


def check_resume_matches(checkpoint: Path, metadata: Mapping[str, str]) -> None:
    """Refuse to resume ``checkpoint`` with another method, rank, alpha, targets, backbone or base model.

    ``metadata`` is the adapter metadata of the run being started; the base model is compared by the content
    fingerprint (``base_fingerprint``) when both carry one, never by its path.
    """
    saved = load_adapter(checkpoint / ADAPTER_FILENAME).metadata
    for key in RESUME_KEYS:
        if key in metadata and key in saved and saved[key] != metadata[key]:
            raise UserError(f"--resume_from_checkpoint {checkpoint}: it was trained with {key} {saved[key]}, "
                            f"this run has {key} {metadata[key]}; resume with the same settings or use another --output_dir")
    differing = fingerprint_difference(saved.get("base_fingerprint"), metadata.get("base_fingerprint"))
    if differing:
        raise UserError(f"--resume_from_checkpoint {checkpoint}: trained on another base model "
                        f"({saved.get('base_model')}); layer {differing} differs from {metadata.get('base_model')}")


def write_checkpoint(output_dir: Path, step: int, save: Callable[[Path], None], *, is_main: bool,
                     barrier: Callable[[], None], keep: int | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically: ``save(partial)`` fills a temporary folder, the marker goes in
    last, the rename publishes it; only then are checkpoints beyond the ``keep`` newest deleted.

    ``save`` runs on every process (accelerate writes each process's RNG state); ``barrier`` waits for all.

    Raises:
        UserError: the save failed (a full disk, a read-only folder); the previous checkpoints are untouched.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f".{final.name}{PARTIAL_SUFFIX}"
    try:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        save(partial)
        barrier()
        if is_main:
            files = sorted(p for p in partial.iterdir() if p.is_file())
            marker = {"step": step, "files": [p.name for p in files],
                      "sizes": {p.name: p.stat().st_size for p in files}}  # a truncated copy is found on resume
            (partial / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _fsync_tree(partial)
            replaced = output_dir / f".{final.name}.replaced"
            if final.exists():  # the same step saved again (resumed from an older one): swap, then delete
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
            _fsync_dir(output_dir)
            shutil.rmtree(replaced, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError, UserError) as err:
        # torch.save reports a full disk as RuntimeError ("unexpected pos"), safetensors as SafetensorError, our
        # adapter writer as UserError: whichever, nothing was published and the older checkpoints stand.
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
        kept = complete_checkpoints(output_dir)
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]) or type(err).__name__
        raise UserError(f"{final}: could not be written ({reason}); last complete checkpoint: "
                        f"{kept[-1] if kept else 'none'}") from None
    barrier()
    if is_main and keep:
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def remove_partials(output_dir: Path) -> list[str]:
    """Delete temporary checkpoint folders and the temporary files of interrupted atomic writes (``.NAME.*.tmp*``:
    the adapter, the run's records, the model card) an interrupted run left behind (call only while holding the
    lock, so no other writer owns them)."""
    removed = []
    for folder in Path(output_dir).glob(f".{CHECKPOINT_PREFIX}*{PARTIAL_SUFFIX}"):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    for stale in Path(output_dir).glob(".*.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


def keep_launcher(output_dir: Path) -> Path | None:
    """Copy the wrapper that launched this run (``$QRLORA_LAUNCHER``, set by scripts/launch_train.sh) into the
    run folder, once the inputs checked out; an existing copy (a resumed run) is kept as it is."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return None
    target = output_dir / Path(launcher).name
    if not target.exists():
        shutil.copyfile(launcher, target)
    return target


def check_finite(parameters: Iterable[torch.Tensor], what: str, output_dir: Path) -> None:
    """Refuse to save diverged parameters: NaN / inf, or so large their squares overflow float32 (|x| > ~1e19).

    A value like 1e30 is finite but makes the next forward pass overflow; a checkpoint of it cannot resume.
    """
    for tensor in parameters:
        t = tensor.detach().float()
        if not torch.isfinite(t).all() or not torch.isfinite(t.square().sum()):
            kept = complete_checkpoints(output_dir)
            raise UserError(f"the adapter parameters diverged (NaN, inf or overflowing values) before {what}; "
                            f"training stopped, last good checkpoint: {kept[-1] if kept else 'none (no checkpoint saved yet)'}")


class RunLock:
    """An exclusive lock on a run folder, so two trainings never write into one ``--output_dir``.

    ``flock`` on ``OUTPUT_DIR/.qrlora-run.lock``: the kernel drops it when the holder exits, even on SIGKILL,
    so a crashed run never blocks its resume. The file holds the holder's pid for the refusal message.
    """

    _held: dict[Path, "RunLock"] = {}  # this process's locks: a run that ended in an error in-process left it
    lock_name = LOCK_NAME

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / self.lock_name
        self._fd: int | None = None

    def in_use(self, holder: str) -> str:
        """The refusal when another process holds the lock (``holder``: its pid)."""
        return (f"--output_dir {self.path.parent} is in use by another training run (pid {holder}); "
                "wait for it to finish or choose another --output_dir")

    def acquire(self) -> "RunLock":
        """Take the lock, or raise ``UserError`` naming the folder and the pid holding it."""
        self._created = not self.path.parent.exists()  # a run that fails before writing anything leaves no folder
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in RunLock._held:  # one process trains one run at a time: an earlier in-process run is over
            RunLock._held.pop(key).release()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(self.in_use(holder)) from None
            # A holder that released and unlinked the file between our open and flock: lock the new file instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        RunLock._held[key] = self
        atexit.register(self.release)  # a run that ends in an error removes its lock file too
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        RunLock._held.pop(self.path.resolve(), None)
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if getattr(self, "_created", False):
            try:
                self.path.parent.rmdir()  # only if still empty: a refused or failed run leaves no empty folder
            except OSError:
                pass

    def __del__(self):
        self.release()


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk before the rename publishes it (a power cut keeps it whole)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
