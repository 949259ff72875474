"""One way down (docs/ARCHITECTURE.md section 3): no import cycle inside ``qrlora/``, module-level or deferred (an
import inside a function counts: it only hides the cycle until that function runs); the published
``python -m qrlora.X`` names hold no library code; one refusal has one owner. Fast: parses source only."""
from __future__ import annotations

import ast
from pathlib import Path

from qrlora.cli.entry_points import ENTRY_POINTS

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qrlora"
# The published `python -m qrlora.X` names (the one list, qrlora/cli/entry_points.py): shims over qrlora.cli.X.
SHIMS = tuple(e.python_m.removeprefix("qrlora.") for e in ENTRY_POINTS if e.python_m)


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module and package of ``qrlora``."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: the qrlora modules it imports}``, every import statement counted (in functions too).

    ``from P import name`` depends on ``P.name`` when that is a module, else on ``P`` itself; relative imports are
    resolved from the importing module's package."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package[: len(package) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in candidates:
                while target and target not in modules:  # `import qrlora.x.attr` -> the module qrlora.x
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    # The negative control: a graph with one two-module cycle and one chain.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "qrlora.core.methods" in graph and graph["qrlora.core.methods"]  # the graph was read
    assert cycles(graph) == []


def test_published_module_names_are_shims_without_library_code():
    for name in SHIMS:
        shim = PACKAGE / f"{name}.py" if (PACKAGE / f"{name}.py").is_file() else PACKAGE / name / "__main__.py"
        tree = ast.parse(shim.read_text())
        body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.If), f"qrlora/{name}.py holds more than the hand-over"
        assert ast.unparse(body[0].test) == "__name__ == '__main__'", f"qrlora/{name}.py: the hand-over is guarded"
        imported = [n.module for n in ast.walk(body[0]) if isinstance(n, ast.ImportFrom)]
        assert imported == [f"qrlora.cli.{name}"], f"qrlora/{name}.py hands over to qrlora.cli.{name}"


def test_the_token_dependent_refusal_has_one_owner():
    """Every "no weight change" refusal goes through ``Method.require_weight_change``: its words are written once."""
    writers = sorted(str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
                     if "is token-dependent and has" in path.read_text())
    assert writers == ["qrlora/core/methods.py"]


def test_a_backbone_owns_its_facts():
    """A new family is its ``backbones/X.py`` plus one registry entry: the tiny builder, the file component, the
    full-size config and the analyses' stage order are read from each registered backbone."""
    from qrlora.backbones import BACKBONES, COMPONENTS
    from qrlora.backbones.base import Backbone

    for backbone in BACKBONES.values():
        assert type(backbone).tiny_pipeline is not Backbone.tiny_pipeline, backbone.name
        assert backbone.published_config and backbone.block_stages, backbone.name
        assert backbone.denoiser_name in COMPONENTS
    tiny = (PACKAGE / "toy" / "tiny.py").read_text()
    assert not any(f'"{name}"' in tiny for name in BACKBONES), "qrlora/toy/tiny.py names a family"
