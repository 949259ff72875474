"""The trainer's typed settings: every ``python -m qrlora.train`` flag as one frozen field, checked once.

``qrlora.cli.train`` parses the flags, applies the defaults a model folder states about itself (a CPU world's
``world.json``) and builds ``TrainSettings`` (``qrlora.cli.arguments.settings_from``); ``qrlora.training.trainer.train``
takes nothing else and changes nothing in it (``--scale_lr`` gives the trainer a local learning rate). Field names are
the flag names (diffusers' DreamBooth LoRA scripts' where they exist); ``__post_init__`` refuses a value that cannot
work with a message that names the flag, before anything loads.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import UserError, seed_problem


@dataclass(frozen=True)
class TrainSettings:
    """One training run's settings (``python -m qrlora.train --help`` says what each flag does)."""

    # ---- model
    pretrained_model_name_or_path: str | None = None  # required
    backbone: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    base_precision: str | None = None
    # ---- data
    instance_data_dir: str | None = None  # required
    instance_prompt: str | None = None  # required
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    resolution: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    cache_latents: bool = False
    cache_dir: str | None = None
    max_sequence_length: int | None = None
    # ---- adapter
    rank: int = 4
    lora_alpha: float | None = None
    lora_layers: str | None = None
    lora_blocks: str | None = None
    lora_init_method: str = "deltaR"
    use_zero_init: bool = True
    delta_scale: float = 0.01
    moe_num_experts: int = 8
    qr_basis: str = "top"
    qr_basis_offset: int = 0
    qr_basis_seed: int = 0
    # ---- optimisation
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    learning_rate: float = 0.0001
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    optimizer: str = "AdamW"
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0001
    adam_epsilon: float = 1e-08
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    blocks_to_swap: int = 0
    seed: int = 0
    # ---- objective
    weighting_scheme: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: int | None = None
    guidance_scale: float | None = None  # None: the backbone's (FLUX: 3.5)
    snr_gamma: float | None = None
    # ---- validation, logging and checkpoints
    output_dir: str = "qrlora-output"
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_epochs: int = 50
    validation_inference_steps: int = 28
    report_to: str = "none"
    logging_dir: str = "logs"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    # ---- export and publishing
    output_kohya_format: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    def __post_init__(self):
        for name in REQUIRED:
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        problem = flag_problem(self)
        if problem:
            raise UserError(problem)

    def command(self) -> str:
        """The ``python -m qrlora.train`` command line that gives these settings: every field that differs from its
        default as its flag (a switch on as ``--name``, a default-on switch off as ``--no-name``). Model cards
        record it when a program, not a shell, started the run."""
        import shlex

        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if isinstance(value, bool):
                argv.append(f"--{f.name}" if value else f"--no-{f.name}")
            elif value is not None:
                argv += [f"--{f.name}", str(value)]
        return "python -m qrlora.train " + shlex.join(argv)

    def scaled_learning_rate(self, processes: int) -> float:
        """``--scale_lr``: the learning rate times the images per update (batch x accumulation x processes)."""
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.gradient_accumulation_steps * self.train_batch_size * processes


REQUIRED = ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt")
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the optimizer's parameters are float32
# Flags that must be at least 1 (a 0 divides by zero or trains nothing) and at least 0.
AT_LEAST_ONE = ("rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                "checkpointing_steps", "checkpoints_total_limit", "validation_epochs", "num_validation_images",
                "validation_inference_steps", "repeats", "moe_num_experts", "max_sequence_length", "lr_num_cycles")
AT_LEAST_ZERO = ("num_class_images", "lr_warmup_steps", "learning_rate", "delta_scale", "max_grad_norm",
                 "adam_weight_decay", "adam_epsilon", "prior_loss_weight", "logit_std", "lr_power", "snr_gamma")


def flag_problem(args) -> str | None:
    """The first flag whose value cannot work (``args``: the parsed flags or a ``TrainSettings``), as a message; None
    when all are fine.

    Checked before anything is loaded, so a typo never surfaces as a traceback after training started.
    """
    for name in AT_LEAST_ONE + AT_LEAST_ZERO:
        value = getattr(args, name)
        if value is None:
            continue
        if not math.isfinite(value):
            return f"--{name} must be a finite number, got {value}"
        if value > FLOAT32_MAX:
            return f"--{name} {value:g} is above float32's largest value ({FLOAT32_MAX:.4g}), the optimizer's precision"
        if value < (1 if name in AT_LEAST_ONE else 0):
            return f"--{name} must be {'a positive integer' if name in AT_LEAST_ONE else 'non-negative'}, got {value}"
    for name in ("lora_alpha", "logit_mean", "mode_scale", "guidance_scale"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or (name == "lora_alpha" and value == 0)):
            return f"--{name} must be a finite{' non-zero' if name == 'lora_alpha' else ''} number, got {value}"
    if args.learning_rate == 0:
        return "--learning_rate must be positive, got 0"
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        return f"--resolution must be a positive multiple of 8, got {args.resolution}"
    for name in ("seed", "qr_basis_seed"):
        if problem := seed_problem(f"--{name}", getattr(args, name)):
            return problem
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            return f"--{name} must be in [0, 1), got {getattr(args, name)}"
    if args.cache_dir and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        return f"--cache_dir: {args.cache_dir} is a file, not a folder"
    if args.lora_layers is not None and not args.lora_layers.strip(" ,"):
        return f"--lora_layers {args.lora_layers!r} names no layer; leave the flag out for the backbone's default targets"
    for flag in ("lora_layers", "lora_blocks"):
        value = getattr(args, flag)
        if value is not None and any(not name.strip() for name in value.split(",")):
            return f"--{flag} {value!r} has an empty entry (an empty suffix would match every layer)"
    for flag in ("instance_data_dir", "class_data_dir"):
        if getattr(args, flag) and Path(getattr(args, flag)).is_file():
            return f"--{flag} {getattr(args, flag)} is a file; give the folder that holds the images"
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
        return "--with_prior_preservation needs --class_data_dir and --class_prompt"
    if args.report_to in ("tensorboard", "wandb") and importlib.util.find_spec(args.report_to) is None:
        return f"--report_to {args.report_to} needs the {args.report_to} package: pip install {args.report_to}"
    if args.report_to == "wandb" and args.hub_token:
        return "--hub_token cannot be used with --report_to wandb (the token would be logged); run `hf auth login` instead"
    return None
