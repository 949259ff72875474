"""The trainer's typed settings: every ``python -m qrlora.train`` flag as one frozen field, checked once.

This dataclass is the one source of every training setting: ``qrlora.cli.train`` builds its parser from the fields
(flag name = field name, default = field default, help / choices / group from the field's metadata, the type from
its annotation), fills the defaults a model folder states about itself, and builds ``TrainSettings``;
``qrlora.training.trainer.train`` takes nothing else and changes nothing in it (``--scale_lr`` gives the trainer a
local learning rate). Field names are the flag names (diffusers' DreamBooth LoRA scripts' where they exist);
``__post_init__`` refuses a value that cannot work with a message that names the flag, before anything loads.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..core.methods import BASES, AdapterConfig
from ..errors import UserError, seed_problem


def _section(group: str):
    """A field maker for one ``--help`` group: ``setting(default, help, **argparse options)``."""

    def setting(default=None, help: str = "", **options):
        return field(default=default, metadata={"group": group, "help": help, **options})

    return setting


def _backbone_names() -> list[str]:  # choices resolved when the parser is built (the registry imports diffusers)
    from ..backbones import BACKBONES
    return list(BACKBONES)


def _method_names() -> list[str]:
    from ..core.methods import METHODS
    return list(METHODS)


def _weighting_schemes() -> list[str]:
    from ..core.objective import WEIGHTING_SCHEMES
    return list(WEIGHTING_SCHEMES)


def _optimizer_name(text: str) -> str:
    """``adamw`` / ``AdamW`` -> ``AdamW``; other names lower-case (``Prodigy`` -> ``prodigy``)."""
    return {"adamw": "AdamW"}.get(text.lower(), text.lower())


model = _section("model")
data = _section("data")
adapter = _section("adapter")
optimisation = _section("optimisation")
objective = _section("objective")
validation = _section("validation, logging and checkpoints")
export = _section("export and publishing")
ADAPTER_DEFAULTS = AdapterConfig()  # the adapter fields' defaults are AdapterConfig's own


@dataclass(frozen=True)
class TrainSettings:
    """One training run's settings (``python -m qrlora.train --help`` says what each flag does)."""

    # ---- model
    pretrained_model_name_or_path: str | None = model(
        None, "diffusers pipeline folder or hub id (default: the --backbone's published model)")
    backbone: str | None = model(None, "expected backbone (default: from model_index.json)", choices=_backbone_names)
    pretrained_vae_model_name_or_path: str | None = model(None, "a separate VAE (e.g. SDXL's fp16-safe VAE)")
    base_precision: str | None = model(
        None, "load the frozen base weights in this dtype (default: as stored, then cast to the mixed precision)",
        choices=("fp32", "bf16", "fp16", "fp8", "nf4"))
    # ---- data
    instance_data_dir: str | None = data(
        None, "folder of the instance (training) images, with img.txt caption files where wanted; kohya's "
              "<repeats>_<name>/ subfolders too (this or --dataset_name is required)")
    dataset_name: str | None = data(
        None, "a datasets dataset instead of --instance_data_dir: an imagefolder (images + metadata.jsonl / .csv), "
              "a save_to_disk folder, or a hub id; its train split")
    image_column: str = data("image", "the dataset's image column")
    caption_column: str | None = data(
        None, "the dataset's caption column (default: text, where the dataset has it; rows without a caption use "
              "--instance_prompt)")
    instance_prompt: str | None = data(
        None, "prompt of every instance image without a caption of its own, with the trigger (e.g. 'a photo of a <c> "
              "cat'); required unless every image has a caption")
    caption_extension: str = data(
        ".txt", "sidecar caption files: img0.png trains on the text of img0.txt (kohya's flag; UTF-8)")
    caption_prefix: str | None = data(
        None, "put this (a trigger word) and a space in front of every caption read from the data (not the "
              "--instance_prompt, used as typed)")
    require_captions: bool = data(
        False, "refuse a dataset where some images have no caption (default: they train on --instance_prompt, "
               "counted in one warning)")
    caption_dropout_rate: float = data(
        0.0, "train this fraction of the instance images' steps on the empty prompt (seeded per step, so a resumed "
             "run draws the same); diffusers' --proportion_empty_prompts", aliases=("--proportion_empty_prompts",))
    with_prior_preservation: bool = data(False, "add the class images' loss (DreamBooth prior preservation)")
    class_data_dir: str | None = data(None, "folder of class images; missing ones are generated with the base pipeline")
    class_prompt: str | None = data(None, "prompt of the class images (e.g. 'a photo of a cat')")
    num_class_images: int = data(100, "class images to use (and generate where missing)")
    prior_loss_weight: float = data(1.0, "weight of the class images' loss")
    resolution: int | None = data(
        None, "training image size in pixels, a multiple of 8 (default: the backbone's, 512 SD3 and FLUX, 1024 SDXL; "
              "a CPU world's own size)")
    enable_bucket: bool = data(
        False, "aspect-ratio buckets (kohya's flag): each image trains at the bucket of about --resolution squared "
               "pixels nearest its aspect ratio (crops only the rounding); every batch draws from one bucket")
    center_crop: bool = data(False, "crop the centre square (default: a seeded random crop)")
    random_flip: bool = data(False, "mirror a seeded half of the images")
    repeats: int = data(1, "copies of every instance image per epoch, each cropped and flipped on its own")
    cache_latents: bool = data(False, "encode every image with the VAE once (then free the pixels)")
    cache_dir: str | None = data(
        None, "disk cache of prompt embeddings and latent distributions (implies --cache_latents): a later run with "
              "the same model files, prompts, images and settings loads no text encoder or VAE encoder")
    max_sequence_length: int | None = data(
        None, "T5 prompt length (default: the world's own for a CPU world, else 77 SD3, 512 FLUX)")
    # ---- adapter
    rank: int = adapter(ADAPTER_DEFAULTS.rank, "adapter rank r")
    lora_alpha: float | None = adapter(ADAPTER_DEFAULTS.alpha, "scale numerator, s = alpha / rank (default: rank, scale 1)")
    lora_layers: str | None = adapter(None, "comma-separated target suffixes (default: the backbone's published set)")
    lora_blocks: str | None = adapter(
        None, "comma-separated block names to restrict targets to (e.g. up_blocks.0.attentions.0)")
    lora_init_method: str = adapter(ADAPTER_DEFAULTS.method, "the adapter method (docs/method.md)", choices=_method_names)
    use_zero_init: bool = adapter(ADAPTER_DEFAULTS.use_zero_init, "zero coefficients at init (identity)")
    delta_scale: float = adapter(ADAPTER_DEFAULTS.delta_scale, "std of the coefficients with --no-use_zero_init")
    moe_num_experts: int = adapter(ADAPTER_DEFAULTS.num_experts,
                                   "experts of --lora_init_method moe (the rank must be a multiple)")
    qr_basis: str | None = adapter(
        None, "frozen basis (default: the method's own). deltaR, triu_deltaR, svd: top = the top-r singular directions "
              "(the paper), random = a seeded random orthonormal Q (a study control); qr_input_frozen: top; "
              "ortho_adapt: random = columns of a seeded orthogonal matrix (default), gaussian = N(0, 1/in) directions",
        choices=BASES)
    qr_basis_offset: int = adapter(ADAPTER_DEFAULTS.basis_offset,
                                   "use directions k+1..k+r instead of the first r: singular directions, or columns of "
                                   "ortho_adapt's draw (give each concept its own offset, e.g. 0 and --rank)")
    qr_basis_seed: int = adapter(ADAPTER_DEFAULTS.basis_seed, "seed of a random or gaussian basis")
    base_adapter: str | None = adapter(
        None, "an adapter file merged in live and frozen while this one trains, which alone is saved (the study's "
              "sequential control: the style adapter trained on top of the content adapter); recorded in the file")
    # ---- optimisation
    train_batch_size: int = optimisation(1, "images per micro-batch and process")
    gradient_accumulation_steps: int = optimisation(1, "micro-batches per optimizer update")
    max_train_steps: int | None = optimisation(None, "optimizer updates (default: --num_train_epochs epochs)")
    num_train_epochs: int = optimisation(1, "epochs, when --max_train_steps is not given")
    learning_rate: float = optimisation(0.0001, "peak learning rate")
    scale_lr: bool = optimisation(False, "multiply the learning rate by accumulation x batch size x processes")
    lr_scheduler: str = optimisation(
        "constant", "a diffusers schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    lr_warmup_steps: int = optimisation(0, "warm-up updates of the schedule")
    lr_num_cycles: int = optimisation(1, "restarts of cosine_with_restarts")
    lr_power: float = optimisation(1.0, "power of the polynomial schedule")
    optimizer: str = optimisation("AdamW", "the optimizer (prodigy needs the prodigyopt package)",
                                  choices=("AdamW", "prodigy"), type=_optimizer_name)
    use_8bit_adam: bool = optimisation(False, "bitsandbytes' 8-bit AdamW")
    adam_beta1: float = optimisation(0.9, "first-moment decay, in [0, 1)")
    adam_beta2: float = optimisation(0.999, "second-moment decay, in [0, 1)")
    adam_weight_decay: float = optimisation(0.0001, "decoupled weight decay of the adapter's parameters")
    adam_epsilon: float = optimisation(1e-08, "added to the denominator")
    prodigy_beta3: float | None = optimisation(None, "Prodigy's step-size EMA coefficient (default: sqrt(beta2))")
    prodigy_decouple: bool = optimisation(True, "AdamW-style decoupled weight decay")
    prodigy_use_bias_correction: bool = optimisation(True, "Adam bias correction (diffusers' scripts turn it on)")
    prodigy_safeguard_warmup: bool = optimisation(True, "remove lr from the denominator of the D estimate during warm-up")
    max_grad_norm: float = optimisation(1.0, "clip the gradient norm to this (0: no clipping)")
    mixed_precision: str = optimisation("no", "autocast dtype (trainable tensors stay float32)", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = optimisation(False, "recompute activations in the backward pass (less memory)")
    blocks_to_swap: int = optimisation(
        0, "keep the frozen weights of the last N transformer blocks in host memory, copied to the GPU one block "
           "ahead of their forward and backward (FLUX, SD3)")
    seed: int = optimisation(ADAPTER_DEFAULTS.seed, "seeds the crops, the training draws and ICA")
    # ---- objective
    weighting_scheme: str | None = objective(
        None, "flow matching timestep density and loss weighting (default: the backbone's: logit_normal SD3, none FLUX)",
        choices=_weighting_schemes)
    logit_mean: float = objective(0.0, "mean of logit_normal timesteps")
    logit_std: float = objective(1.0, "std of logit_normal timesteps")
    mode_scale: float = objective(1.29, "scale of the mode weighting scheme")
    precondition_outputs: int | None = objective(
        None, "x0-preconditioned flow loss (default 1 on SD3 as diffusers, 0 on FLUX)", choices=(0, 1))
    guidance_scale: float | None = objective(None, "FLUX guidance embedding during training (default: the backbone's, "
                                                   "3.5 for FLUX as diffusers' FLUX script)")
    snr_gamma: float | None = objective(None, "SDXL min-SNR weighting gamma (default: off)")
    # ---- validation, logging and checkpoints
    output_dir: str | None = validation(
        None, "the run folder, created once every input checked out (default: the backbone's run root, exps_SD3/, "
              "exps_flux/ or exps_SDXL/, then --run_name)")
    run_name: str | None = validation(
        None, "the run folder's name under the backbone's run root when --output_dir is not given; the SD3 and SDXL "
              "layouts append -<method> (default: qrlora-run)")
    validation_data_dir: str | None = validation(
        None, "held-out images (with caption files, like --instance_data_dir) whose loss is reported every "
              "--validation_steps at fixed noise and timesteps; costs no training randomness")
    validation_split: float = validation(
        0.0, "hold out this fraction of the training images (a seeded choice) for the validation loss instead")
    validation_steps: int = validation(100, "report the validation loss every this many updates, and at the end")
    validation_prompt: str | None = validation(None, "render this prompt during and after training (default: no validation)")
    num_validation_images: int = validation(4, "images per validation")
    validation_epochs: int = validation(50, "validate every this many epochs, and at the end")
    validation_inference_steps: int = validation(28, "denoising steps of a validation image")
    report_to: str = validation("none", "experiment tracker of the loss, learning rate and validation images",
                                choices=("tensorboard", "wandb", "none"))
    logging_dir: str = validation("logs", "TensorBoard's folder inside --output_dir (made only with --report_to tensorboard)")
    checkpointing_steps: int = validation(500, "save checkpoint-N every this many updates")
    checkpoints_total_limit: int | None = validation(None, "keep only the newest N checkpoints (default: all)")
    resume_from_checkpoint: str | None = validation(None, "a checkpoint-N folder, or 'latest' (default: start afresh)")
    # ---- export and publishing
    output_kohya_format: bool = export(
        False, "also write pytorch_lora_weights_kohya.safetensors (ComfyUI, A1111/Forge, kohya sd-scripts)")
    push_to_hub: bool = export(False, "upload the run folder to the Hugging Face Hub at the end")
    hub_model_id: str | None = export(None, "hub repository for --push_to_hub (default: the --output_dir folder name)")
    hub_token: str | None = export(None, "hub token (default: the one `hf auth login` stored)")

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

    def adapter_config(self) -> AdapterConfig:
        """The ``AdapterConfig`` these settings train (the one place flag names meet the config's field names)."""
        return AdapterConfig(method=self.lora_init_method, rank=self.rank, alpha=self.lora_alpha,
                             use_zero_init=self.use_zero_init, delta_scale=self.delta_scale,
                             num_experts=self.moe_num_experts, seed=self.seed, basis=self.qr_basis,
                             basis_offset=self.qr_basis_offset, basis_seed=self.qr_basis_seed)

    def for_backbone(self, backbone) -> TrainSettings:
        """These settings with the detected ``backbone``'s defaults filled in: its training resolution and its run
        folder (``<run_root>/<run_name>``, ``-<method>`` appended where its published layout has it). ``self``
        when nothing is left to fill, so settings that came filled are not checked again."""
        filled = {}
        if self.resolution is None:
            filled["resolution"] = backbone.default_resolution
        if self.output_dir is None:
            name = self.run_name or DEFAULT_RUN_NAME
            if backbone.run_name_has_method:
                name = f"{name}-{self.lora_init_method}"
            filled["output_dir"] = str(Path(backbone.run_root) / name)
        return replace(self, **filled) if filled else self


DEFAULT_RUN_NAME = "qrlora-run"
REQUIRED = ("pretrained_model_name_or_path",)
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the optimizer's parameters are float32
# Flags that must be at least 1 (a 0 divides by zero or trains nothing) and at least 0.
AT_LEAST_ONE = ("rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                "checkpointing_steps", "checkpoints_total_limit", "validation_epochs", "validation_steps", "num_validation_images",
                "validation_inference_steps", "repeats", "moe_num_experts", "max_sequence_length", "lr_num_cycles")
AT_LEAST_ZERO = ("num_class_images", "lr_warmup_steps", "learning_rate", "delta_scale", "max_grad_norm",
                 "adam_weight_decay", "adam_epsilon", "prior_loss_weight", "logit_std", "lr_power", "snr_gamma")


def flag_problem(args) -> str | None:
    """The first flag whose value cannot work (``args``: a ``TrainSettings``; its ``__post_init__`` is the one
    caller), as a message; None when all are fine.

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
    if not (args.instance_data_dir or args.dataset_name):
        return "--instance_data_dir (a folder of images) or --dataset_name (a dataset) is required"
    if args.instance_data_dir and args.dataset_name:
        return "--instance_data_dir and --dataset_name both name the training images; give one"
    if args.enable_bucket and args.with_prior_preservation:
        return "--enable_bucket with --with_prior_preservation is not supported (class images are square); use one"
    if not 0 <= args.validation_split < 1:
        return f"--validation_split must be in [0, 1), got {args.validation_split}"
    if args.validation_split and args.validation_data_dir:
        return "--validation_split and --validation_data_dir both name held-out images; give one"
    if not 0 <= args.caption_dropout_rate <= 1:
        return f"--caption_dropout_rate must be in [0, 1], got {args.caption_dropout_rate}"
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        return f"--caption_extension must be a file extension such as .txt or .caption, got {args.caption_extension!r}"
    if args.instance_prompt is not None and not args.instance_prompt.strip():
        return "--instance_prompt is empty; give the prompt, or leave the flag out when every image has a caption"
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
        return "--with_prior_preservation needs --class_data_dir and --class_prompt"
    if args.report_to in ("tensorboard", "wandb") and importlib.util.find_spec(args.report_to) is None:
        return f"--report_to {args.report_to} needs the {args.report_to} package: pip install {args.report_to}"
    if args.report_to == "wandb" and args.hub_token:
        return "--hub_token cannot be used with --report_to wandb (the token would be logged); run `hf auth login` instead"
    return None
