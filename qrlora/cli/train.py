"""``python -m qrlora.train`` / ``accelerate launch -m qrlora.train`` / ``qrlora-train``: the trainer's flags, the
checks on their values (before anything loads), and the call into ``qrlora.training.trainer.train``."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from ..backbones import BACKBONES, detect_backbone
from ..errors import UserError, cli_entry
from ..toy.world.world import WORLD_FILE, load_world
from ..training import trainer
from ..training.config_file import config_argv
from ..training.settings import TrainSettings
from .arguments import ArgumentParser, settings_from


TYPES = {"int": int, "float": float, "str": str}


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags, one per ``TrainSettings`` field: its name, default, help, choices and ``--help`` group
    come from the field (``qrlora.training.settings``), its type from the annotation; ``--help`` shows the default."""
    p = ArgumentParser(prog="python -m qrlora.train", description=trainer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in dataclasses.fields(TrainSettings):
        meta = dict(f.metadata)
        group = meta.pop("group")
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        options = {"default": f.default, "help": meta.pop("help")}
        choices = meta.pop("choices", None)
        if choices is not None:
            options["choices"] = list(choices() if callable(choices) else choices)
        kind = f.type.split("|")[0].strip()  # "int | None" -> "int" (the module uses postponed annotations)
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            options["type"] = meta.pop("type", TYPES[kind])
        aliases = meta.pop("aliases", ())  # another script's name for the same flag
        groups[group].add_argument(f"--{f.name}", *aliases, **options, **meta)
    p.add_argument_group("settings file").add_argument(
        "--config", help="a .toml or .yaml file of settings (keys: these flags' names); flags on the command line "
                         "override it; every run writes its resolved settings to <output_dir>/config.toml")
    return p


def expand_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's flags, put first so the command line overrides them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    return rest if known.config is None else config_argv(known.config, TrainSettings) + rest


def parse_args(argv=None) -> TrainSettings:
    """Parse the trainer's flags, fill the defaults the model states about itself (a CPU world's ``world.json``,
    then the detected backbone's resolution and run folder), and build the typed settings, whose check runs
    once (a bad value is one ``error:`` line naming its flag)."""
    p = build_parser()
    try:
        expanded = expand_config(sys.argv[1:] if argv is None else list(argv))
    except UserError as err:
        p.error(str(err))
    args = p.parse_args(expanded)
    try:
        if args.pretrained_model_name_or_path is None and args.backbone is not None:
            args.pretrained_model_name_or_path = BACKBONES[args.backbone].default_model
        apply_model_defaults(args)
        settings = settings_from(TrainSettings, args)
    except UserError as err:
        p.error(str(err))
    backbone = known_backbone(settings)
    return settings if backbone is None else settings.for_backbone(backbone)


def known_backbone(settings: TrainSettings):
    """The backbone of a local pipeline folder (or the one ``--backbone`` names); None when neither says, e.g. a
    hub id not downloaded yet: the trainer detects it then, and fills the same defaults."""
    if (Path(settings.pretrained_model_name_or_path) / "model_index.json").is_file():
        try:
            return detect_backbone(settings.pretrained_model_name_or_path, settings.backbone)
        except UserError:
            return None  # the trainer reports it, after its other checks
    return BACKBONES.get(settings.backbone)


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Defaults a model folder states about itself: a CPU world (``world.json``) gives its T5 prompt length and
    image size, so leaving out ``--max_sequence_length`` never trains at a length the world never saw."""
    if args.pretrained_model_name_or_path and (Path(args.pretrained_model_name_or_path) / WORLD_FILE).is_file():
        world = load_world(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
        args.max_sequence_length = args.max_sequence_length or world.max_sequence_length
        args.resolution = args.resolution or world.resolution


@cli_entry
def main(argv=None) -> Path:
    settings = parse_args(argv)
    command = "python -m qrlora.train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return trainer.train(settings, command)
