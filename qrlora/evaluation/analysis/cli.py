"""What the analysis runs share: strict JSON output and the ``--output_dir`` check (devices: ``qrlora.core.devices``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...files.outputs import StagedFolder, atomic_output


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON; refuses NaN/inf (``allow_nan=False``) so files stay strict JSON."""
    path = Path(path)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def _output_dir(path: str | os.PathLike, key_file: str, overwrite: bool) -> StagedFolder:
    """The run's output folder, staged: checked now (a folder, writable, ``key_file`` of an earlier run not
    there unless ``overwrite``), filled in a hidden sibling, published all at once by ``.publish()``."""
    return StagedFolder(path, key_files=[key_file], overwrite=overwrite)
