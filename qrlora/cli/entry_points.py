"""The one list of the package's commands: each console script, the ``main`` it runs, and the ``python -m`` name
that runs the same ``main`` (None where the published name is a script under SD3_dir/, flux_dir/, SDXL_dir/).

``pyproject.toml``'s ``[project.scripts]`` must say exactly this, and every ``python -m`` module hands over to
exactly this ``main`` (``tests/test_cli.py``); the shim modules are ``qrlora/<name>.py``, or a package's
``__main__.py`` (``qrlora/ui/``).
"""
from __future__ import annotations

from typing import NamedTuple


class EntryPoint(NamedTuple):
    script: str  # the console script
    target: str  # module:function
    python_m: str | None  # the `python -m` module running the same function


ENTRY_POINTS = (
    EntryPoint("qrlora-train", "qrlora.cli.train:main", "qrlora.train"),
    EntryPoint("qrlora-merge", "qrlora.cli.merge:merge_main", "qrlora.merge"),
    EntryPoint("qrlora-grid", "qrlora.cli.merge:grid_main", None),
    EntryPoint("qrlora-export", "qrlora.cli.export:main", "qrlora.export"),
    EntryPoint("qrlora-residual", "qrlora.cli.residual:save_base_residual_main", None),
    EntryPoint("qrlora-extract-residual", "qrlora.cli.residual:extract_main", None),
    EntryPoint("qrlora-tiny", "qrlora.cli.tiny:main", "qrlora.tiny"),
    EntryPoint("qrlora-tiny-scorers", "qrlora.cli.tiny_scorers:main", "qrlora.tiny_scorers"),
    EntryPoint("qrlora-evaluate", "qrlora.cli.evaluate:main", "qrlora.evaluate"),
    EntryPoint("qrlora-ziplora", "qrlora.cli.ziplora:main", "qrlora.ziplora"),
    EntryPoint("qrlora-compare", "qrlora.cli.compare:main", "qrlora.compare"),
    EntryPoint("qrlora-runs", "qrlora.cli.runs:main", "qrlora.runs"),
    EntryPoint("qrlora-world", "qrlora.cli.world:main", "qrlora.world"),
    EntryPoint("qrlora-ui", "qrlora.cli.ui:main", "qrlora.ui"),
)
