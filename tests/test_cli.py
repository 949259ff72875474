"""Entry points: every console command of the package loads and answers --help, and every published script name
runs from any folder without path shims (the package is installed, as the README's set-up line does)."""
from __future__ import annotations

import runpy
import subprocess
import sys
from importlib.metadata import distribution

import pytest

from conftest import REPO

COMMANDS = sorted((ep.name, ep.value) for ep in distribution("qrlora").entry_points if ep.group == "console_scripts")
SCRIPTS = sorted(str(p.relative_to(REPO)) for d in ("SD3_dir", "flux_dir", "SDXL_dir", "test") for p in (REPO / d).glob("*.py"))


def test_console_commands_are_declared():
    names = {name for name, _ in COMMANDS}
    assert {"qrlora-train", "qrlora-merge", "qrlora-export", "qrlora-tiny", "qrlora-evaluate"} <= names


@pytest.mark.parametrize("name,target", COMMANDS)
def test_console_command_answers_help(name, target, capsys):
    module, _, function = target.partition(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_published_script_answers_help_without_path_shims(script, monkeypatch, capsys):
    assert "sys.path" not in (REPO / script).read_text()
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_a_published_script_runs_from_another_folder(tmp_path):
    """A fresh interpreter outside the checkout finds the installed package (no shim puts the repo on sys.path)."""
    script = REPO / "SD3_dir" / "inference.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


def test_python_m_merge_imports_the_library_once():
    """``python -m qrlora.merge`` must not execute the library a second time as ``__main__`` (one ``Merger``)."""
    # Count the Merger classes while the command runs (at argument parsing), the temporary __main__ included.
    code = """
import argparse, runpy, sys
def count_and_stop(self, *args, **kwargs):
    classes = {id(m.Merger) for k, m in list(sys.modules.items())
               if k.startswith(("qrlora", "__main__")) and hasattr(m, "Merger")}
    print("MERGER_CLASSES", len(classes))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = count_and_stop
runpy.run_module("qrlora.merge", run_name="__main__", alter_sys=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "MERGER_CLASSES 1" in proc.stdout, proc.stdout[-500:] + proc.stderr[-1500:]
