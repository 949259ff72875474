"""``--config run.toml`` / ``run.yaml``: training settings from a file, read with ``tomllib`` or PyYAML and handed to
the one parser as flags, and the resolved ``config.toml`` every run writes (``tomli_w``).

A file holds ``TrainSettings`` field names (the flag names without ``--``) with TOML / YAML values; tables (TOML
``[data]``, a YAML mapping) only group keys and may carry any name. The file's flags go in front of the command
line's, so a flag typed on the command line overrides the file (argparse keeps the last value). A key that is no
setting is refused naming the nearest one; a value of the wrong type is refused naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path

from ..errors import UserError
from ..files.outputs import atomic_output

#: Settings a written config.toml leaves out: a secret, and an action of one launch (not what it trains).
NOT_RECORDED = ("hub_token", "resume_from_checkpoint")
CONFIG_NAME = "config.toml"
#: Settings that name local files or folders (written absolute where they exist).
PATHS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "instance_data_dir", "dataset_name", "class_data_dir",
         "cache_dir", "output_dir")


def read_config(path: str | Path) -> dict:
    """The file's ``{key: value}``, tables flattened (their names only group keys)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config: {path} does not exist" if not path.exists() else f"--config: {path} is not a file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        else:
            raise UserError(f"--config: {path} is neither .toml nor .yaml / .yml")
    except UnicodeDecodeError:
        raise UserError(f"--config: {path} is not UTF-8 text") from None
    except UserError:
        raise
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: one line with the parser's position
        raise UserError(f"--config: {path} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"--config: {path} must hold key = value settings, not a {type(data).__name__}")
    flat: dict = {}

    def collect(table: dict):
        for key, value in table.items():
            if isinstance(value, dict):
                collect(value)
            elif key in flat:
                raise UserError(f"--config: {path} sets {key} twice")
            else:
                flat[str(key)] = value
    collect(data)
    return flat


def config_argv(path: str | Path, settings_class) -> list[str]:
    """The flags ``path`` stands for: ``--key value`` per setting, a switch as ``--key`` / ``--no-key``.

    Raises:
        UserError: naming the file and key: an unknown key (with the nearest setting), a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(settings_class)}
    argv = []
    for key, value in read_config(path).items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]} (--{near[0]})?" if near else "; see python -m qrlora.train --help"
            raise UserError(f"--config: {path}: unknown key {key!r}{hint}")
        if value is None:  # YAML's null: the default
            continue
        field = fields[key]
        kind = field.type.split("|")[0].strip()
        if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        wrong = {"bool": not isinstance(value, bool),
                 "int": isinstance(value, bool) or not isinstance(value, int),
                 "float": isinstance(value, bool) or not isinstance(value, (int, float)),
                 "str": not isinstance(value, str)}[kind]
        if wrong:
            what = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}[kind]
            raise UserError(f"--config: {path}: {key} = {value!r} must be {what}")
        if kind == "bool":
            if value != field.default or value:
                argv.append(f"--{key}" if value else f"--no-{key}")
        else:
            argv += [f"--{key}", repr(value) if kind == "float" else str(value)]
    return argv


def write_config(settings, folder: str | Path) -> Path:
    """``folder/config.toml``: every setting of the run as resolved (defaults filled), bar ``NOT_RECORDED``; a
    ``--config`` of it with another ``--output_dir`` trains the same adapter."""
    import tomli_w

    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.name not in NOT_RECORDED and getattr(settings, f.name) is not None}
    for name in PATHS:  # absolute, so the file trains the same run from any folder
        if name in values and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    path = Path(folder) / CONFIG_NAME
    header = ("# The resolved settings of this run (python -m qrlora.train --config config.toml --output_dir NEW\n"
              "# trains it again). Unset flags are absent; hub_token and resume_from_checkpoint are never written.\n")
    with atomic_output(path) as tmp:
        tmp.write_text(header + tomli_w.dumps(values), encoding="utf-8")
    return path
