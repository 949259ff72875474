"""Entry points: every console command of the package loads and answers --help, every ``python -m qrlora.X`` does
too without executing its library module twice, every published script name runs from any folder without path
shims (the package is installed, as the README's set-up line does), and argparse lives in ``qrlora.cli`` only."""
from __future__ import annotations

import ast
import runpy
import subprocess
import sys

import pytest

from conftest import REPO

from qrlora.cli.entry_points import ENTRY_POINTS


def declared_commands() -> list[tuple[str, str]]:
    """(name, module:function) from pyproject.toml, the file that declares them; the installed metadata is stale
    until a reinstall. Python 3.10 has no tomllib and reads the installed metadata."""
    try:
        import tomllib
    except ModuleNotFoundError:
        from importlib.metadata import distribution

        return sorted((ep.name, ep.value) for ep in distribution("qrlora").entry_points if ep.group == "console_scripts")
    return sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"].items())


COMMANDS = declared_commands()
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


# Every `python -m qrlora.X`: the one list of entry points.
PYTHON_M = [e.python_m for e in ENTRY_POINTS if e.python_m]


def test_the_console_scripts_are_the_one_list():
    """pyproject.toml's [project.scripts] and qrlora/cli/entry_points.py name the same commands and functions."""
    assert COMMANDS == sorted((e.script, e.target) for e in ENTRY_POINTS)
    assert {"qrlora.train", "qrlora.merge", "qrlora.world", "qrlora.ui"} <= set(PYTHON_M)


@pytest.mark.parametrize("entry", [e for e in ENTRY_POINTS if e.python_m], ids=lambda e: e.python_m)
def test_python_m_runs_the_console_scripts_function(entry):
    """``python -m qrlora.X`` hands over to the very function its console script runs."""
    name = entry.python_m.removeprefix("qrlora.")
    shim = REPO / "qrlora" / f"{name}.py"
    shim = shim if shim.is_file() else REPO / "qrlora" / name / "__main__.py"
    tree = ast.parse(shim.read_text())
    imports = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    module, function = entry.target.split(":")
    assert imports == [(module, function)] and function in calls, f"{shim} does not run {entry.target}"


def _parsers(entry) -> list:
    """The argparse parser a console script builds (and its sub-commands' parsers), caught at parse time."""
    import argparse

    module, _, function = entry.target.partition(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        with pytest.raises(SystemExit):
            main([])
    finally:
        argparse.ArgumentParser.parse_args = original
    parsers, todo = [], caught[:1]
    while todo:
        parser = todo.pop()
        parsers.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(dict.fromkeys(action.choices.values()))
    return parsers


# qrlora-train's parser is generated from TrainSettings (its help is checked where that happens).
HELPED = [e for e in ENTRY_POINTS if e.script != "qrlora-train"]


@pytest.mark.parametrize("entry", HELPED, ids=lambda e: e.script)
def test_help_gives_every_flag_a_sentence_and_its_default(entry):
    """``--help`` of every console script: each flag has a sentence, and says its default (required flags and
    positional arguments have none to say)."""
    import argparse

    lacking = []
    for parser in _parsers(entry):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            text = formatter._get_help_string(action) if action.help else ""
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if len((action.help or "").split()) < 2:
                lacking.append(f"{name}: no sentence")
            elif action.option_strings and not action.required and "default" not in text:
                lacking.append(f"{name}: no default")
    assert not lacking, "\n".join(lacking)


@pytest.mark.parametrize("module", PYTHON_M)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # in-process: the module is imported already
def test_python_m_answers_help(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(module, run_name="__main__")
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_python_m_defines_nothing_as_main():
    """Each ``python -m qrlora.X`` hands over to ``qrlora.cli`` before the library module defines anything, so the
    library runs once, as itself (a function or class defined in ``__main__`` would be its second copy)."""
    code = """
import argparse, inspect, runpy, sys
def report(self, *args, **kwargs):
    main = sys.modules["__main__"]
    own = sorted(k for k, v in vars(main).items()
                 if (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == "__main__")
    print("DEFINED_IN_MAIN", MODULE, own)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = report
for MODULE in sys.argv[1:]:
    try:
        runpy.run_module(MODULE, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
"""
    modules = PYTHON_M
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, cwd=REPO)
    for module in modules:
        assert f"DEFINED_IN_MAIN {module} []" in proc.stdout, proc.stdout[-1500:] + proc.stderr[-1500:]


def _imports(path, tree=None):
    """(dotted name, node) of every import in ``path``, relative imports resolved; ``from M import x`` gives M and
    M.x (x may be a submodule)."""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(tree or ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, node
            yield from ((f"{module}.{alias.name}", node) for alias in node.names)


LIBRARY = sorted(p for p in (REPO / "qrlora").rglob("*.py") if p.relative_to(REPO / "qrlora").parts[0] != "cli")


def test_argparse_lives_in_the_cli_layer_only():
    """One CLI layer: no library module builds a parser."""
    offenders = sorted({str(p.relative_to(REPO)) for p in LIBRARY
                        for name, _ in _imports(p) if name.split(".")[0] == "argparse"})
    assert offenders == []


def test_library_modules_never_import_the_cli_layer():
    """The imports run one way, qrlora.cli -> library (no cycle); the one exception is the ``python -m`` guard,
    which only runs when the module is ``__main__``."""
    offenders = []
    for path in LIBRARY:
        tree = ast.parse(path.read_text())
        guarded = {id(n) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
                   for n in ast.walk(top)}
        offenders += [f"{path.relative_to(REPO)}: {name}" for name, node in _imports(path, tree)
                      if (name == "qrlora.cli" or name.startswith("qrlora.cli.")) and id(node) not in guarded]
    assert offenders == []


@pytest.mark.parametrize("argv", [["--no_such_flag"], ["in.safetensors", "out.safetensors", "--format", "nope"], []])
def test_a_bad_flag_is_one_error_line(argv, capsys):
    """argparse's own errors (unknown flag, bad type, missing required flag) take the one error path too."""
    from qrlora.cli.export import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--help" in err, err
