"""Writing outputs safely: checked before any compute, never half-written, never over a user's file unasked.

Every CLI checks its output locations first (``check_writable``: a folder, writable, with room for an estimate
of what it will write; ``refuse_existing``: no silent overwrite without ``--overwrite``), computes, then writes
each file or folder under a temporary sibling name and renames it into place (``atomic_output``), so a crash
or a full disk leaves either the old file or the new one, never a truncated one under the final name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UserError

MARGIN_BYTES = 16 << 20  # headroom over an estimate: metadata, PNG compression variance, filesystem blocks


def current_umask() -> int:
    """The process umask (reading it means setting it; put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(folder: str | os.PathLike, flag: str, estimate_bytes: int = 0) -> Path:
    """Refuse now, before loading models, an output folder that cannot take the outputs.

    The folder may not exist yet (its nearest existing parent is checked, nothing is created). Refused: a path
    that is a file, a folder without write permission, less free space than ``estimate_bytes`` plus a margin.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if estimate_bytes and free < estimate_bytes + MARGIN_BYTES:
        raise UserError(f"{flag} {folder}: {free / 2**20:.0f} MiB free on its disk, about "
                        f"{(estimate_bytes + MARGIN_BYTES) / 2**20:.0f} MiB needed")
    return folder


def refuse_existing(paths: Iterable[str | os.PathLike], overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse to replace existing outputs unless ``overwrite``; a folder in the way is refused always."""
    for path in map(Path, paths):
        if path.is_dir():
            raise UserError(f"{path}: a folder is in the way of an output file")
        if path.exists() and not overwrite:
            raise UserError(f"{path} already exists; pass {flag} to replace it")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; on success rename it to ``path``, else remove it.

    For a folder (``folder=True``) the temporary is a folder, and an existing target is replaced only after
    the new one is complete. Files get the permissions the umask gives, as a plain ``open`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~current_umask())
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not folder:  # after the write: some writers (safetensors) replace the file they were given
            os.chmod(tmp, 0o666 & ~current_umask())
        if folder and path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


class StagedFolder:
    """An output folder whose files appear all at once: written into a hidden sibling, moved in by ``publish``.

    ``folder / name`` is the staging path to write to; ``str(folder)`` is the final folder (for messages). A run
    that fails before ``publish`` (a full disk, an error) leaves the final folder as it was, and its staging
    folder is removed. The checks of ``check_writable`` and ``refuse_existing`` (for ``key_files``, the files
    that show an earlier run's outputs are there) run first, before any compute.
    """

    def __init__(self, final: str | os.PathLike, *, key_files: Iterable[str] = (), overwrite: bool = False,
                 flag: str = "--output_dir", estimate_bytes: int = 0):
        self.final = check_writable(final, flag, estimate_bytes)
        refuse_existing([self.final / name for name in key_files], overwrite)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=self.final.parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._stage, True)

    def __truediv__(self, name: str) -> Path:
        return self._stage / name

    def __str__(self) -> str:
        return str(self.final)

    def publish(self) -> Path:
        """Move every staged file into the final folder (renames on one disk: they cannot run out of space)."""
        self.final.mkdir(parents=True, exist_ok=True)
        mode = 0o666 & ~current_umask()
        for path in sorted(self._stage.iterdir()):
            os.chmod(path, mode)
            os.replace(path, self.final / path.name)
        self._cleanup()
        return self.final
