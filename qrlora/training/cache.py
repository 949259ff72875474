"""The disk cache of ``--cache_dir``: tensors keyed by everything that determines them, written atomically.

An entry is two files named by the SHA-256 of its key (canonical JSON of the key's fields):
``<key>.safetensors`` (the tensors) and ``<key>.json`` (the key's fields, readable, and the SHA-256 of the
safetensors file). The JSON is written last, so an entry without one is simply missing; an entry whose JSON
or tensors do not read back, or whose tensors do not match the recorded hash, is refused with one warning
naming the file and computed again.

Models are keyed by the content of their files (``files_fingerprint``): the SHA-256 of every file of the named
components. A file of at least ``MEMO_MIN_BYTES`` has its SHA-256 memoised in ``file_hashes.json``, so a 9 GB T5
encoder is read once, not on every run. The memo is keyed on the file's content, never on its path or times (a
replaced file with the old size and mtime was reused, issue 30): its size, its safetensors header (tensor names,
dtypes, shapes, offsets) and ``SAMPLE_BLOCKS`` blocks of 64 KiB read evenly across it (4 MiB read, not 9 GB; a
retrained or replaced model changes every block). The same model at another path hits the memo; a read-only
cache is only read. A damaged memo (not JSON, ``null``, a list, short entries, another version) is said in one
line and recomputed.
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
MEMO_FORMAT = "qrlora-file-hashes"
MEMO_VERSION = 2  # 1 (no format field): {path: [size, mtime_ns, sha256]}, keyed on mtime
MEMO_MIN_BYTES = 16 << 20  # smaller files are hashed whole on every run (milliseconds)
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 1 << 16
SAFETENSORS_HEADER_MAX = 100 << 20  # a header length above this is not a safetensors header


def content_signature(path: Path) -> str:
    """A cheap identity of a large file's content: SHA-256 of its size, its safetensors header when it has one,
    and ``SAMPLE_BLOCKS`` evenly spaced blocks (the first and the last included)."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"size:{size}".encode())
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if 0 < header_length <= min(SAFETENSORS_HEADER_MAX, size - 8):
            digest.update(b"header:" + handle.read(header_length))
        for index in range(SAMPLE_BLOCKS):
            offset = (size - SAMPLE_BYTES) * index // (SAMPLE_BLOCKS - 1) if size > SAMPLE_BYTES else 0
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


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
        if path.stat().st_size < MEMO_MIN_BYTES:  # follows hub-cache symlinks to their blobs
            return _sha256_file(path)
        memo = self._load_memo()
        signature = content_signature(path)
        if not _is_sha256(memo.get(signature)):
            memo[signature] = _sha256_file(path)
            self._memo_dirty = True
        return memo[signature]

    def _load_memo(self) -> dict:
        """``{content signature: sha256}`` from ``file_hashes.json``; a damaged one is said once and ignored."""
        if self._memo is not None:
            return self._memo
        self._memo, path = {}, self.folder / MEMO_NAME
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return self._memo
        except OSError:
            return self._memo  # unreadable (permissions): hash the files
        except ValueError:
            record = "not JSON (truncated or empty)"
        if isinstance(record, dict) and record.get("format") == MEMO_FORMAT and record.get("version") == MEMO_VERSION \
                and isinstance(record.get("hashes"), dict):
            self._memo = {k: v for k, v in record["hashes"].items() if _is_sha256(v)}
            if len(self._memo) == len(record["hashes"]):
                return self._memo
            problem = f"{len(record['hashes']) - len(self._memo)} entries are not SHA-256 digests"
        elif isinstance(record, dict) and "format" not in record and all(isinstance(v, list) for v in record.values()):
            problem = "written by an older version, keyed on modification times"
        else:
            problem = record if isinstance(record, str) else f"a JSON {type(record).__name__}, not a memo"
        logger.warning("--cache_dir: %s is damaged (%s); hashing the model files again", path, problem)
        self._memo_dirty = True
        return self._memo

    def _save_memo(self) -> None:
        if self.write and getattr(self, "_memo_dirty", False):
            record = {"format": MEMO_FORMAT, "version": MEMO_VERSION, "hashes": self._memo}
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_output(self.folder / MEMO_NAME) as tmp:
                    tmp.write_text(json.dumps(record, indent=0, sort_keys=True))
            except OSError as err:  # a read-only cache: it is read, never written; the files are hashed again next run
                logger.warning("--cache_dir: cannot update %s (%s); model files will be hashed again next run",
                               self.folder / MEMO_NAME, err.strerror or err)
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
