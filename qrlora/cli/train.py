"""``python -m qrlora.train`` / ``accelerate launch -m qrlora.train`` / ``qrlora-train``: the trainer's flags, the
checks on their values (before anything loads), and the call into ``qrlora.training.trainer.train``."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..training import trainer
from ..backbones import BACKBONES
from ..errors import cli_entry
from ..core.methods import METHODS
from ..core.objective import WEIGHTING_SCHEMES
from ..toy.world.world import WORLD_FILE, load_world
from ..errors import UserError
from ..training.settings import TrainSettings, flag_problem
from .arguments import ArgumentParser, settings_from


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags; every one has a help line, and ``--help`` shows its default."""
    p = ArgumentParser(prog="python -m qrlora.train", description=trainer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="diffusers pipeline folder or hub id")
    g.add_argument("--backbone", choices=list(BACKBONES), help="expected backbone (default: from model_index.json)")
    g.add_argument("--pretrained_vae_model_name_or_path", help="a separate VAE (e.g. SDXL's fp16-safe VAE)")
    g.add_argument("--base_precision", choices=["fp32", "bf16", "fp16", "fp8", "nf4"], help="load the frozen base weights in this dtype (default: as stored, then cast to the mixed precision)")
    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", required=True, help="folder of the instance (training) images")
    g.add_argument("--instance_prompt", required=True, help="prompt of every instance image, with the trigger (e.g. 'a photo of a <c> cat')")
    g.add_argument("--with_prior_preservation", action="store_true", help="add the class images' loss (DreamBooth prior preservation)")
    g.add_argument("--class_data_dir", help="folder of class images; missing ones are generated with the base pipeline")
    g.add_argument("--class_prompt", help="prompt of the class images (e.g. 'a photo of a cat')")
    g.add_argument("--num_class_images", type=int, default=100, help="class images to use (and generate where missing)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class images' loss")
    g.add_argument("--resolution", type=int, help="training image size in pixels, a multiple of 8 (default: 512, or the world's size for a CPU world)")
    g.add_argument("--center_crop", action="store_true", help="crop the centre square (default: a seeded random crop)")
    g.add_argument("--random_flip", action="store_true", help="mirror a seeded half of the images")
    g.add_argument("--repeats", type=int, default=1, help="copies of every instance image per epoch, each cropped and flipped on its own")
    g.add_argument("--cache_latents", action="store_true", help="encode every image with the VAE once (then free the pixels)")
    g.add_argument("--cache_dir", help="disk cache of prompt embeddings and latent distributions (implies --cache_latents): "
                   "a later run with the same model files, prompts, images and settings loads no text encoder or VAE encoder")
    g.add_argument("--max_sequence_length", type=int, help="T5 prompt length (default: the world's own for a CPU world, else 77 SD3, 512 FLUX)")
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=4, help="adapter rank r")
    g.add_argument("--lora_alpha", type=float, help="scale numerator, s = alpha / rank (default: rank, scale 1)")
    g.add_argument("--lora_layers", help="comma-separated target suffixes (default: the backbone's published set)")
    g.add_argument("--lora_blocks", help="comma-separated block names to restrict targets to (e.g. up_blocks.0.attentions.0)")
    g.add_argument("--lora_init_method", choices=list(METHODS), default="deltaR", help="the adapter method (README: The method)")
    g.add_argument("--use_zero_init", action=argparse.BooleanOptionalAction, default=True, help="zero coefficients at init (identity)")
    g.add_argument("--delta_scale", type=float, default=0.01, help="std of the coefficients with --no-use_zero_init")
    g.add_argument("--moe_num_experts", type=int, default=8, help="experts of --lora_init_method moe (the rank must be a multiple)")
    g.add_argument("--qr_basis", choices=("top", "random"), default="top",
                   help="frozen Q basis (deltaR, triu_deltaR, svd): top = the top-r singular directions (the paper); "
                        "random = a seeded random orthonormal Q, a control of the disentanglement study (default top)")
    g.add_argument("--qr_basis_offset", type=int, default=0,
                   help="use singular directions k+1..k+r instead of the top r (a study control; default 0)")
    g.add_argument("--qr_basis_seed", type=int, default=0, help="seed of --qr_basis random (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=1, help="images per micro-batch and process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer update")
    g.add_argument("--max_train_steps", type=int, help="optimizer updates (default: --num_train_epochs epochs)")
    g.add_argument("--num_train_epochs", type=int, default=1, help="epochs, when --max_train_steps is not given")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--scale_lr", action="store_true", help="multiply the learning rate by accumulation x batch size x processes")
    g.add_argument("--lr_scheduler", default="constant", help="a diffusers schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up updates of the schedule")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--optimizer", choices=["AdamW", "prodigy"], default="AdamW", type=lambda s: {"adamw": "AdamW"}.get(s.lower(), s.lower()), help="the optimizer (prodigy needs the prodigyopt package)")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="first-moment decay, in [0, 1)")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="second-moment decay, in [0, 1)")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="decoupled weight decay of the adapter's parameters")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="added to the denominator")
    g.add_argument("--prodigy_beta3", type=float, help="Prodigy's step-size EMA coefficient (default: sqrt(beta2))")
    g.add_argument("--prodigy_decouple", action=argparse.BooleanOptionalAction, default=True, help="AdamW-style decoupled weight decay")
    g.add_argument("--prodigy_use_bias_correction", action=argparse.BooleanOptionalAction, default=True, help="Adam bias correction (diffusers' scripts turn it on)")
    g.add_argument("--prodigy_safeguard_warmup", action=argparse.BooleanOptionalAction, default=True, help="remove lr from the denominator of the D estimate during warm-up")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="autocast dtype (trainable tensors stay float32)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    g.add_argument("--blocks_to_swap", type=int, default=0, help="keep the frozen weights of the last N transformer "
                   "blocks in host memory, copied to the GPU one block ahead of their forward and backward (FLUX, SD3)")
    g.add_argument("--seed", type=int, default=0, help="seeds the crops, the training draws and ICA")
    g = p.add_argument_group("objective")
    g.add_argument("--weighting_scheme", choices=list(WEIGHTING_SCHEMES), help="flow matching timestep density and loss weighting (default: the backbone's: logit_normal SD3, none FLUX)")
    g.add_argument("--logit_mean", type=float, default=0.0, help="mean of logit_normal timesteps")
    g.add_argument("--logit_std", type=float, default=1.0, help="std of logit_normal timesteps")
    g.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode weighting scheme")
    g.add_argument("--precondition_outputs", type=int, choices=[0, 1], help="x0-preconditioned flow loss (default 1 on SD3 as diffusers, 0 on FLUX)")
    g.add_argument("--guidance_scale", type=float, help="FLUX guidance embedding during training (default: 3.5, as diffusers' FLUX script)")
    g.add_argument("--snr_gamma", type=float, help="SDXL min-SNR weighting gamma (default: off)")
    g = p.add_argument_group("validation, logging and checkpoints")
    g.add_argument("--output_dir", default="qrlora-output", help="the run folder (created once every input checked out)")
    g.add_argument("--validation_prompt", help="render this prompt during and after training (default: no validation)")
    g.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    g.add_argument("--validation_epochs", type=int, default=50, help="validate every this many epochs, and at the end")
    g.add_argument("--validation_inference_steps", type=int, default=28, help="denoising steps of a validation image")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "none"], default="none", help="experiment tracker of the loss, learning rate and validation images")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard's folder inside --output_dir (made only with --report_to tensorboard)")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save checkpoint-N every this many updates")
    g.add_argument("--checkpoints_total_limit", type=int, help="keep only the newest N checkpoints (default: all)")
    g.add_argument("--resume_from_checkpoint", help="a checkpoint-N folder, or 'latest' (default: start afresh)")
    g = p.add_argument_group("export and publishing")
    g.add_argument("--output_kohya_format", action="store_true",
                   help="also write pytorch_lora_weights_kohya.safetensors (ComfyUI, A1111/Forge, kohya sd-scripts)")
    g.add_argument("--push_to_hub", action="store_true", help="upload the run folder to the Hugging Face Hub at the end")
    g.add_argument("--hub_model_id", help="hub repository for --push_to_hub (default: the --output_dir folder name)")
    g.add_argument("--hub_token", help="hub token (default: the one `hf auth login` stored)")
    return p


def parse_args(argv=None) -> TrainSettings:
    """Parse the trainer's flags, fill the defaults a model folder states about itself, and build the typed
    settings (a bad value is one ``error:`` line naming its flag)."""
    p = build_parser()
    args = p.parse_args(argv)
    problem = flag_problem(args)
    if problem:  # before the model folder is read: a bad flag is named even when the model is missing
        p.error(problem)
    apply_model_defaults(args)
    try:
        return settings_from(TrainSettings, args)
    except UserError as err:
        p.error(str(err))


DEFAULT_RESOLUTION = 512


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Defaults a model folder states about itself: a CPU world (``world.json``) gives its T5 prompt length and
    image size, so leaving out ``--max_sequence_length`` never trains at a length the world never saw."""
    if (Path(args.pretrained_model_name_or_path) / WORLD_FILE).is_file():
        world = load_world(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
        args.max_sequence_length = args.max_sequence_length or world.max_sequence_length
        args.resolution = args.resolution or world.resolution
    args.resolution = args.resolution or DEFAULT_RESOLUTION


@cli_entry
def main(argv=None) -> Path:
    settings = parse_args(argv)
    command = "python -m qrlora.train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return trainer.train(settings, command)
