"""Flag groups several commands share: rendering (merge CLIs, ZipLoRA, compare), merge strategies with ZipLoRA's and
K-LoRA's options, and the scoring models (evaluate, compare). Defaults come from the library modules that own them."""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import TypeVar

from ..core.devices import DTYPES
from ..errors import SEED_MAX, UserError
from ..evaluation.evaluate import DEFAULT_CLIP, DEFAULT_CONCEPT_TOKENS, DEFAULT_DINO
from ..merging.klora import KLORA_ALPHA, KLORA_BETA, KLORA_K
from ..merging.strategies import STRATEGIES
from ..merging.ziplora import ZIPLORA_LAMBDA, ZIPLORA_LR, ZIPLORA_STEPS


Settings = TypeVar("Settings")


def settings_from(cls: type[Settings], parsed: argparse.Namespace) -> Settings:
    """The typed settings ``cls`` (a frozen dataclass of the library) from the parsed flags of the same names: the
    one place a namespace becomes what the library takes. Its ``__post_init__`` checks every field, naming the flag."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(parsed).items() if name in names})


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose flag errors take the one error path: ``error: <what> (see <prog> --help)``, exit 2.

    Plain argparse prints the whole usage block first (40 lines for the trainer), burying the line that says
    which flag is wrong; every command's parser is this class so a bad flag reads like every other user error.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("formatter_class", argparse.RawDescriptionHelpFormatter) is argparse.RawDescriptionHelpFormatter:
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)
        # A value such as "-1,2" (a negative first weight) is a value, not an unknown flag: argparse's own test
        # for negative numbers knows only single numbers, so `--weights -1,2` failed as "expected one argument".
        self._negative_number_matcher = NEGATIVE_NUMBERS

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
NEGATIVE_NUMBERS = re.compile(rf"^-{NUMBER}(,\s*-?{NUMBER})*$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each flag's default appended, ``(default: X)``, unless its help already says it or it has
    none to show (a switch that is off, a value the help explains)."""

    def _get_help_string(self, action):
        text = action.help or ""
        # identity, not ==: a default of 0 is shown (0 == False), None and a switch that is off are not
        shown = not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and action.option_strings
        if shown and "default" not in text:
            text += f" (default: {action.default})" if text else f"(default: {action.default})"
        elif isinstance(action, argparse._StoreTrueAction) and "default" not in text:
            text += " (default: off)"  # a switch: say so, or a reader cannot tell on from off
        return text


def number_list(text: str) -> str:
    """An argparse ``type`` for comma lists of weights (``"0,0.5,1"``, ``"-1,2"``): every entry a finite number,
    none empty (``"1,,1"`` is refused, not read as two weights). Returns the text as given."""
    for index, entry in enumerate(text.split(","), 1):
        if not entry.strip():
            raise argparse.ArgumentTypeError(f"entry {index} of {text!r} is empty; give one number per entry")
        try:
            value = float(entry)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{entry.strip()!r} (entry {index} of {text!r}) is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"entry {index} of {text!r} is not a finite number")
    return text


def positive(kind: type):
    """An argparse ``type`` that parses ``kind`` (int or float) and refuses zero, negatives, NaN and inf, so a bad
    count or rate is reported by the parser, in its one error line, before anything runs."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def seed(text: str) -> int:
    """An argparse ``type`` for a seed: an integer in [0, 2**32 - 1] (numpy's range), refused by the parser
    rather than by numpy deep inside a run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, {SEED_MAX}], got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """An argparse ``type`` for a comma list of seeds (``"0,1,2"``), each one a ``seed``; no empty or repeated entry."""
    values = []
    for index, entry in enumerate(text.split(","), 1):
        if not entry.strip():
            raise argparse.ArgumentTypeError(f"entry {index} of {text!r} is empty; give one seed per entry")
        try:
            values.append(seed(entry.strip()))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"entry {index} of {text!r}: {err}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return values


def report_name(text: str) -> str:
    """An argparse ``type`` for a report's file name: a plain name, no folder part (``../x`` would write outside
    the output folder), so NAME.json / .md / .png land in the folder the user gave."""
    if not text or text in (".", "..") or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"{text!r} must be a plain file name (no folder, not hidden); "
                                         "the report goes to --output (and --report_dir)")
    return text


def add_render_arguments(p: argparse.ArgumentParser, backbone_default_steps: int = 28) -> None:
    g = p.add_argument_group("rendering")
    g.add_argument("--prompt", default="a photo of a <c> cat in <s> style", help="the text prompt to render")
    g.add_argument("--num_inference_steps", type=int, default=backbone_default_steps, help="denoising steps per image")
    g.add_argument("--guidance_scale", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 16")
    g.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 16")
    g.add_argument("--seed", type=seed, default=0, help="seed of the starting noise (the same for every weight)")
    g.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype while rendering (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--device", help="where to render, e.g. cuda:1 (default: cuda if available, else cpu)")
    g.add_argument("--max_sequence_length", type=int, help="T5 prompt length (default: the pipeline's)")
    g.add_argument("--output_dir", default="inference_output", help="folder the images (and manifest.json) go to")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same name (images, a comparison, a written adapter)")


def unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_strategy_arguments(p: argparse.ArgumentParser) -> None:
    """``--merge_strategy`` and each strategy's flags."""
    p.add_argument("--merge_strategy", choices=list(STRATEGIES), default="direct",
                   help="direct: weighted addition (default); ziplora: learned column coefficients; klora: top-K switch; "
                        "ties / dare: PEFT's TIES and DARE rules on each layer's dW")
    add_strategy_options(p)


def add_strategy_options(p: argparse.ArgumentParser) -> None:
    """The flags of the ZipLoRA and K-LoRA strategies."""
    add_ziplora_arguments(p)
    g = p.add_argument_group("K-LoRA (--merge_strategy klora)")
    g.add_argument("--klora_k", type=int, default=KLORA_K, help="top-K entries compared per layer (published code: 64)")
    g.add_argument("--klora_alpha", type=float, default=KLORA_ALPHA, help="S(t) = alpha t/T + beta (paper: 1.5)")
    g.add_argument("--klora_beta", type=float, default=KLORA_BETA, help="(paper: 0.5)")
    g = p.add_argument_group("TIES / DARE (--merge_strategy ties | dare, PEFT's merge_utils)")
    g.add_argument("--merge_density", type=unit_interval, default=0.5,
                   help="fraction of each dW's entries kept (TIES: largest magnitudes; DARE: random, rescaled); default 0.5")
    g.add_argument("--ties_majority_sign", choices=("total", "frequency"), default="total",
                   help="TIES sign election (PEFT's majority_sign_method; default total)")


def add_ziplora_arguments(p: argparse.ArgumentParser) -> None:
    """ZipLoRA's flags (shared by ``qrlora.merging.ziplora`` and the merge CLIs' ``--merge_strategy ziplora``)."""
    g = p.add_argument_group("ZipLoRA (--merge_strategy ziplora)")
    g.add_argument("--ziplora_steps", type=int, default=ZIPLORA_STEPS, help="gradient updates (paper: 100)")
    g.add_argument("--ziplora_lr", type=float, default=ZIPLORA_LR, help="Adam learning rate of the coefficients")
    g.add_argument("--ziplora_lambda", type=float, default=ZIPLORA_LAMBDA, help="weight of the cosine penalty (paper: 0.01)")
    g.add_argument("--content_prompt", help="the content adapter's own prompt (default: its instance_prompt metadata)")
    g.add_argument("--style_prompt", help="the style adapter's own prompt (default: its instance_prompt metadata)")


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``qrlora.evaluation.evaluate`` and ``qrlora.evaluation.compare``."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--clip_model", default=DEFAULT_CLIP, help="hub id or local folder of a CLIP model (CLIP-T, CLIP-I)")
    g.add_argument("--dino_model", default=DEFAULT_DINO, help="hub id or local folder of a DINO / DINOv2 model")
    g.add_argument("--concept_tokens", default=DEFAULT_CONCEPT_TOKENS, help="comma list removed from prompts for CLIP-T")
    g.add_argument("--eval_batch_size", type=int, default=16, help="images scored per batch")
