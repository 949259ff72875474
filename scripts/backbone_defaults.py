"""Print a backbone's rendering defaults as shell assignments, for scripts/launch_inference.sh and the residual
wrapper (the training wrappers need none: the trainer fills the backbone's model, resolution and run folder itself):

    python scripts/backbone_defaults.py flux
    DEFAULT_MODEL=black-forest-labs/FLUX.1-dev DEFAULT_INFERENCE_STEPS=28 DEFAULT_SIZE=1024

The one owner of these facts is the backbone's class in ``qrlora/backbones/`` (``default_model``,
``default_inference_steps``, ``default_image_size``; docs/ARCHITECTURE.md s. 3). This script reads
them from the source with ``ast`` instead of importing the package: importing the registry imports torch and
diffusers (about 10 s on 2 cores), and a wrapper should start at once. A class attribute a subclass does not set is
taken from its base classes, as Python would. The attributes must stay literals; a test compares every output with
the imported registry, so a value this reader cannot see fails the suite, not a user's run.
"""
from __future__ import annotations

import ast
import shlex
import sys
from pathlib import Path

BACKBONES_DIR = Path(__file__).resolve().parent.parent / "qrlora" / "backbones"
#: shell variable -> Backbone class attribute
FIELDS = {
    "DEFAULT_MODEL": "default_model",
    "DEFAULT_INFERENCE_STEPS": "default_inference_steps",
    "DEFAULT_SIZE": "default_image_size",
}


def read_classes(folder: Path = BACKBONES_DIR) -> dict[str, tuple[list[str], dict[str, object]]]:
    """``{class name: (base class names, {attribute: literal value})}`` of every class in ``folder/*.py``."""
    classes = {}
    for source in sorted(folder.glob("*.py")):
        for node in ast.parse(source.read_text(), str(source)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            literals = {}
            for statement in node.body:
                target, value = None, None
                if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                    target, value = statement.targets[0], statement.value
                elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
                    target, value = statement.target, statement.value
                if isinstance(target, ast.Name):
                    try:
                        literals[target.id] = ast.literal_eval(value)
                    except ValueError:
                        pass  # a computed attribute: not a wrapper default
            bases = [base.id if isinstance(base, ast.Name) else getattr(base, "attr", "") for base in node.bases]
            classes[node.name] = (bases, literals)
    return classes


def attribute(classes, class_name: str, name: str):
    """``class_name``'s class attribute ``name``, looked up through its bases (depth first, as single inheritance)."""
    bases, literals = classes[class_name]
    if name in literals:
        return literals[name]
    for base in bases:
        if base in classes:
            found = attribute(classes, base, name)
            if found is not None:
                return found
    return None


def families(classes) -> dict[str, str]:
    """``{backbone name: class name}`` of every class that names a family (a non-empty literal ``name``)."""
    return {literals["name"]: class_name for class_name, (_, literals) in classes.items()
            if isinstance(literals.get("name"), str) and literals["name"]}


def wrapper_defaults(backbone: str) -> dict[str, str]:
    """The shell assignments for ``backbone``; ``KeyError`` when no class in qrlora/backbones names it."""
    classes = read_classes()
    class_name = families(classes)[backbone]
    values = {}
    for variable, name in FIELDS.items():
        value = attribute(classes, class_name, name)
        if value is None or value == "":
            raise ValueError(f"qrlora/backbones: {class_name}.{name} is not set to a literal")
        values[variable] = str(int(value)) if isinstance(value, bool) else str(value)
    return values


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/backbone_defaults.py BACKBONE", file=sys.stderr)
        return 2
    try:
        values = wrapper_defaults(argv[0])
    except KeyError:
        known = ", ".join(sorted(families(read_classes())))
        print(f"error: unknown BACKBONE '{argv[0]}'; choose one of {known}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(f"{variable}={shlex.quote(value)}" for variable, value in values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
