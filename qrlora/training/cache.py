"""The disk cache of ``--cache_dir``: tensors keyed by everything that determines them, written atomically.

An entry is two files named by the SHA-256 of its key (canonical JSON of the key's fields):
``<key>.safetensors`` (the tensors) and ``<key>.json`` (the key's fields, readable, and the SHA-256 of the
safetensors file). The JSON is written last, so an entry without one is simply missing; an entry whose JSON
or tensors do not read back, or whose tensors do not match the recorded hash, is refused with one warning
naming the file and computed again.

Models are keyed by the content of their files (``files_fingerprint``): the SHA-256 of every file of the named
components, memoised in ``file_hashes.json`` by (path, size, modification time) so a 9 GB T5 encoder is read
once, not on every run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..files.checkpoint import atomic_save_safetensors, read_safetensors
from ..errors import UserError
from ..files.outputs import atomic_output

logger = logging.getLogger("qrlora.cache")
FORMAT = "qrlora-cache"
VERSION = 1
MEMO_NAME = "file_hashes.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a key field for preprocessed pixels)."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class DiskCache:
    """Entries under ``folder`` (created on first write). ``write=False``: read-only (non-main processes)."""

    def __init__(self, folder: str | os.PathLike, write: bool = True):
        self.folder = Path(folder)
        self.write = write
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--cache_dir: {self.folder} is a file, not a folder")
        self._memo: dict | None = None

    # ---- model fingerprints -------------------------------------------------------------------------
    def files_fingerprint(self, root: str | os.PathLike, names: Iterable[str]) -> str:
        """SHA-256 over the content of every file under ``root/name`` for each of ``names`` (files or folders;
        missing ones are skipped), with their relative paths: the identity of those model components."""
        root = Path(root)
        lines = []
        for name in sorted(set(names)):
            target = root / name
            files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target] if target.is_file() else []
            lines += [f"{p.relative_to(root).as_posix()}:{self._file_hash(p)}" for p in files]
        self._save_memo()
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def _file_hash(self, path: Path) -> str:
        if self._memo is None:
            try:
                self._memo = json.loads((self.folder / MEMO_NAME).read_text())
            except (OSError, ValueError):
                self._memo = {}
        stat = path.stat()  # follows hub-cache symlinks to their blobs
        key, seen = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        cached = self._memo.get(key)
        if not (isinstance(cached, list) and cached[:2] == seen):
            self._memo[key] = cached = seen + [_sha256_file(path)]
            self._memo_dirty = True
        return cached[2]

    def _save_memo(self) -> None:
        if self.write and getattr(self, "_memo_dirty", False):
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.folder / MEMO_NAME) as tmp:
                tmp.write_text(json.dumps(self._memo, indent=0, sort_keys=True))
            self._memo_dirty = False

    # ---- entries ------------------------------------------------------------------------------------
    @staticmethod
    def key(fields: Mapping) -> str:
        """The entry name of ``fields`` (JSON-serialisable): SHA-256 of their canonical JSON."""
        return hashlib.sha256(json.dumps({"format": FORMAT, "version": VERSION, **fields}, sort_keys=True).encode()).hexdigest()

    def paths(self, fields: Mapping) -> tuple[Path, Path]:
        name = self.key(fields)
        return self.folder / f"{name}.safetensors", self.folder / f"{name}.json"

    def get(self, fields: Mapping) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``fields``; None when missing, or (one warning naming the file) corrupt."""
        tensors_path, meta_path = self.paths(fields)
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} entry")
            if meta.get("key") != json.loads(json.dumps(dict(fields))):
                raise ValueError("its recorded key is not the one it is named by")
            if meta.get("sha256") != _sha256_file(tensors_path):
                raise ValueError("its tensors do not match the recorded hash")
            tensors, _ = read_safetensors(tensors_path)
        except (OSError, ValueError, UserError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            logger.warning("--cache_dir: ignoring corrupt cache entry %s (%s); computing it again", meta_path, reason)
            return None
        return tensors

    def put(self, fields: Mapping, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``fields``: the safetensors file, then the JSON that makes the entry visible."""
        if not self.write:
            return
        tensors_path, meta_path = self.paths(fields)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, tensors_path)
        meta = {"format": FORMAT, "version": VERSION, "key": dict(fields), "sha256": _sha256_file(tensors_path)}
        with atomic_output(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
