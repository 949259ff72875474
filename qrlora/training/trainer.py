"""The one DreamBooth trainer: any backbone (SD3, FLUX, SDXL) x any method of the registry, driven by accelerate.

    accelerate launch -m qrlora.train --pretrained_model_name_or_path MODEL --instance_data_dir DIR \
        --instance_prompt "a photo of sks dog" --rank 64 --lora_init_method triu_deltaR --output_dir OUT

The backbone comes from the pipeline's ``model_index.json`` (``--backbone`` checks it). Flag names follow
diffusers' DreamBooth LoRA scripts where they exist.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import pickle
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..backbones import detect_backbone
from .blockswap import attach_block_swap, check_blocks_to_swap
from .buckets import bucket_batches, make_buckets, side_multiple
from .cache import DiskCache
from .config_file import write_config
from ..files.checkpoint import (ADAPTER_FILENAME, AdapterFile, adapter_from_model, adapter_metadata, base_fingerprint,
                                fingerprint_difference, load_adapter, save_adapter)
from .data import DreamBoothDataset, collate, drop_captions
from .sources import FROM_INSTANCE_PROMPT, CaptionRules, Example, dataset_examples, folder_examples
from ..core.devices import DTYPES, MIXED_PRECISION_DTYPES
from .encoders import Encoders
from ..errors import UserError
from ..files.export import export_lora, kohya_path
from ..files.hub import push_run_folder
from ..files.outputs import atomic_output
from ..core.inject import attach_adapter, inject_adapters, trainable_parameters
from .launch import check_launch
from ..core.layers import adapter_layers, apply_constraints_, cast_base_model_
from ..core.methods import METHODS
from ..files.model_card import card_snippet_settings, write_model_card
from ..core.objective import step_generator
from .prior import generate_class_images
from ..core.prompts import check_prompt_lengths
from ..core.quantize import LIBRARIES, check_available, quantize_base_
from ..files.run_folder import (RunLock, check_finite, check_resume_matches, complete_checkpoints, keep_launcher, remove_partials,
                                resolve_resume, write_checkpoint)
from .settings import TrainSettings
from .sharding import fsdp_launch, prepare_sharded, shard_base
from .tracking import log_validation_images
from .validation_loss import ValidationLoss, held_out

logger = logging.getLogger("qrlora.train")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), dealt across processes.

    Depends only on its arguments, so a resumed run sees exactly the batches the uninterrupted run would.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_step = batch_size * world
    steps = math.ceil(n / per_step)
    order = (order * math.ceil(steps * per_step / n))[: steps * per_step]
    return [order[(s * world + rank) * batch_size:(s * world + rank + 1) * batch_size] for s in range(steps)]


def build_optimizer(settings: TrainSettings, params, learning_rate: float | None = None):
    """AdamW (optionally bitsandbytes 8-bit) or Prodigy at ``learning_rate`` (default ``settings.learning_rate``);
    a clear error when the package is missing."""
    learning_rate = settings.learning_rate if learning_rate is None else learning_rate
    kwargs = dict(lr=learning_rate, betas=(settings.adam_beta1, settings.adam_beta2), weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)
    if settings.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise UserError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        if learning_rate <= 0.1:
            logger.warning("--learning_rate %g with --optimizer prodigy: Prodigy adapts the step size itself and "
                           "expects a learning rate around 1.0", learning_rate)
        return prodigyopt.Prodigy(params, beta3=settings.prodigy_beta3, decouple=settings.prodigy_decouple,
                                  use_bias_correction=settings.prodigy_use_bias_correction,
                                  safeguard_warmup=settings.prodigy_safeguard_warmup, **kwargs)
    if settings.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def base_dtype(settings) -> torch.dtype | None:
    """dtype to load the frozen base denoiser in: as stored unless ``--base_precision`` asks for less memory.

    The bases are decomposed from the weights as loaded, so a bf16 base gives (slightly) different Q and R than
    the stored fp32 weights; adapters meant to share Q and R must use the same setting. fp8 / nf4 load in bf16,
    decompose, then quantize the base (``qrlora.core.quantize``).
    """
    if settings.base_precision in LIBRARIES:
        check_available(settings.base_precision)
        return torch.bfloat16
    return DTYPES.get(settings.base_precision)  # None: as stored


def update_groups(batches: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    """An epoch's micro-batches grouped into optimizer updates of ``accumulation`` micro-batches each.

    The last group of an epoch may be shorter (as with diffusers' prepared dataloader, which syncs at the end
    of every epoch): so an epoch is always ``ceil(batches / accumulation)`` updates, whatever divides what.
    """
    return [batches[i:i + accumulation] for i in range(0, len(batches), accumulation)]


def batch_latents(backbone, vae, batch: dict, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Normalised latents (B, C, h, w) of a batch: a fresh sample of each image's latent distribution.

    ``vae``: the VAE, or ``qrlora.training.encoders.Encoders`` (its device, dtype, config and encode, VAE loaded lazily).
    """
    if "latent_params" in batch:  # --cache_latents: the distribution was computed once, the sample is per step
        dist = DiagonalGaussianDistribution(batch["latent_params"].to(vae.device, vae.dtype))
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
    return backbone.normalize_latents(vae.config, dist.sample(generator)).to(dtype)


def train(settings: TrainSettings, command: str) -> Path:
    """Train one adapter as the parsed flags (``qrlora.cli.train``) say; ``command`` is the command line the model
    card records. Returns the final adapter file."""
    # ---- 1. Check every input before loading anything heavy ------------------------------------------
    shard_plan = fsdp_launch(settings)  # an FSDP launch: checked, then run by accelerate as data parallel (training/sharding.py)
    check_launch()  # several processes that accelerate would each run alone: stop before any of them writes
    backbone = detect_backbone(settings.pretrained_model_name_or_path, settings.backbone)
    settings = settings.for_backbone(backbone)  # its resolution and run folder where the settings left them open
    max_sequence_length = settings.max_sequence_length or backbone.default_max_sequence_length
    scheduler = backbone.load_scheduler(settings.pretrained_model_name_or_path)
    objective = backbone.objective(
        scheduler, weighting_scheme=settings.weighting_scheme, logit_mean=settings.logit_mean, logit_std=settings.logit_std,
        mode_scale=settings.mode_scale, guidance_scale=settings.guidance_scale, snr_gamma=settings.snr_gamma,
        precondition_outputs=None if settings.precondition_outputs is None else bool(settings.precondition_outputs))
    # A frozen copy of the training noise table: validation pipelines call set_timesteps on their scheduler.
    schedule = backbone.noise_schedule(scheduler)
    targets = settings.lora_layers.split(",") if settings.lora_layers else list(backbone.default_targets)
    blocks = settings.lora_blocks.split(",") if settings.lora_blocks else None
    config = settings.adapter_config()
    output_dir = Path(settings.output_dir)
    base_dtype(settings)  # fail now, not after loading, when fp8 / nf4 cannot work here
    check_blocks_to_swap(settings.blocks_to_swap, backbone.count_transformer_blocks(settings.pretrained_model_name_or_path),
                         backbone.name, quantized=settings.base_precision in LIBRARIES)
    if settings.output_kohya_format:
        METHODS[settings.lora_init_method].require_weight_change("--output_kohya_format", "a kohya LoRA file is a weight change",
                                                             "leave out --output_kohya_format and merge the run live")
    if settings.dataset_name:  # each image with its caption
        examples = dataset_examples(settings.dataset_name, CaptionRules.of(settings), settings.image_column, settings.caption_column)
    else:
        examples = folder_examples(settings.instance_data_dir, CaptionRules.of(settings))
    examples, held_out_examples = held_out(settings, examples)  # --validation_data_dir / --validation_split
    buckets = (make_buckets(settings.resolution, side_multiple(settings.pretrained_model_name_or_path, backbone.denoiser_name))
               if settings.enable_bucket else None)
    dataset = DreamBoothDataset(examples, resolution=settings.resolution, center_crop=settings.center_crop,
                                random_flip=settings.random_flip, repeats=settings.repeats, seed=settings.seed, buckets=buckets)
    base_adapter = load_base_adapter(settings.base_adapter, backbone)
    metadata = adapter_metadata(config, component=backbone.denoiser_name, backbone=backbone.name,
                                base_model=settings.pretrained_model_name_or_path, targets=targets,
                                extra={"lora_blocks": json.dumps(blocks or []),
                                       "instance_prompt": settings.instance_prompt or most_common_caption(examples),
                                       **({"base_adapter": settings.base_adapter} if base_adapter else {})})
    check_prompt_lengths(settings.pretrained_model_name_or_path, max_sequence_length, trained_prompts(examples + held_out_examples),
                         {"--class_prompt": settings.class_prompt, "--validation_prompt": settings.validation_prompt})
    # One run per folder: the main process holds the folder's lock for the whole run (the kernel drops it on exit).
    run_lock = RunLock(output_dir).acquire() if PartialState().is_main_process else None
    resume_from = resolve_resume(settings.resume_from_checkpoint, output_dir)
    if resume_from is not None:
        check_resume_matches(resume_from, metadata)
    if run_lock is not None and remove_partials(output_dir):
        logger.warning("removed the temporary files of an interrupted save in %s", output_dir)
    if run_lock is not None:
        keep_launcher(output_dir)

    # ---- 2. Accelerator: devices, processes, mixed precision, trackers ------------------------------
    # Accumulation is done here (step 8), not by accelerate: without a prepared dataloader accelerate never
    # sees an epoch end, and a non-dividing epoch would lose updates.
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision, log_with=None if settings.report_to == "none" else settings.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / settings.logging_dir)),
    )
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(settings.seed, device_specific=True)  # third-party code only: training draws use step_generator
    weight_dtype = MIXED_PRECISION_DTYPES[accelerator.mixed_precision]
    # The frozen base trains in the dtype asked for (--base_precision), else in the mixed-precision dtype.
    model_dtype = base_dtype(settings) or weight_dtype
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- 3. Prior preservation: class images, generated with the base pipeline where missing -------
    if settings.with_prior_preservation:
        if accelerator.is_main_process:
            generate_class_images(backbone, settings, device, weight_dtype)
        accelerator.wait_for_everyone()
        dataset = DreamBoothDataset(examples, resolution=settings.resolution, center_crop=settings.center_crop,
                                    random_flip=settings.random_flip, repeats=settings.repeats, seed=settings.seed,
                                    class_dir=settings.class_data_dir, num_class_images=settings.num_class_images,
                                    class_prompt=settings.class_prompt)

    # ---- 4. Encode every prompt once and free the text encoders (--cache_dir: from disk, nothing loaded) --
    encoders = Encoders(backbone, settings.pretrained_model_name_or_path, vae_path=settings.pretrained_vae_model_name_or_path,
                        device=device, text_dtype=weight_dtype, vae_dtype=torch.float32 if backbone.vae_in_float32 else weight_dtype,
                        max_sequence_length=max_sequence_length,
                        cache=DiskCache(settings.cache_dir, write=accelerator.is_main_process) if settings.cache_dir else None)
    empty_id = dataset.prompt_id("") if settings.caption_dropout_rate > 0 else None  # caption dropout's prompt
    cond_table = cast_floating(encoders.prompts(dataset.prompts), model_dtype)  # row i: dataset.prompts[i]
    validation_cond = (encoders.prompts([settings.validation_prompt]), encoders.negative()) if settings.validation_prompt else None
    validation_loss = (ValidationLoss(backbone, held_out_examples, settings, encoders, model_dtype)
                       if held_out_examples and accelerator.is_main_process else None)
    encoders.free_text()
    if settings.cache_latents or settings.cache_dir:
        dataset.cache(encoders.latent_params)

    # ---- 5. Adapters: decompose in float32 from the weights as loaded, then cast the base -----------
    denoiser = backbone.load_denoiser(settings.pretrained_model_name_or_path, base_dtype(settings))
    report = inject_adapters(denoiser, config, targets, blocks=blocks, progress=accelerator.is_main_process, decompose_device=device)
    logger.info(str(report))
    cast_base_model_(denoiser, model_dtype)
    # Fingerprinted before any weight is swapped out or quantized: it names the base model as loaded.
    metadata["base_fingerprint"] = base_fingerprint({p: layer.base_layer.weight for p, layer in adapter_layers(denoiser)})
    if base_adapter is not None:  # live and frozen beside the trained adapter; never saved with it
        attach_base_adapter(denoiser, base_adapter, settings.base_adapter)
    if settings.base_precision in LIBRARIES:  # on the host, on the way to the device: never the whole bf16 base there
        quantize_base_(denoiser, settings.base_precision)
    attach_block_swap(backbone, denoiser, settings.blocks_to_swap, device)  # before .to(device): swapped weights stay on the host
    if shard_plan is not None:  # instead of .to(device): each process moves only its shards of the frozen base
        shard_base(backbone, denoiser, device, shard_plan)
    else:
        denoiser.to(device)
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if resume_from is not None:
        check_resume_matches(resume_from, metadata)  # again: the base fingerprint exists only once the model is loaded

    # ---- 6. Optimizer and schedule: exactly max_steps updates, ceil(batches / accumulation) per epoch --
    world = accelerator.num_processes
    def batches_of(epoch: int, rank: int) -> list[list[int]]:  # --enable_bucket: each batch from one bucket
        if buckets is None:
            return epoch_batches(len(dataset), settings.train_batch_size, settings.seed, epoch, rank, world)
        return bucket_batches([im.target_size for im in dataset.instance], settings.train_batch_size, settings.seed,
                              epoch, rank, world)
    batches_per_epoch = len(batches_of(0, 0))
    updates_per_epoch = math.ceil(batches_per_epoch / settings.gradient_accumulation_steps)
    max_steps = settings.max_train_steps or settings.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    params = trainable_parameters(denoiser)  # the adapters' parameters, collected once (not on every step)
    optimizer = build_optimizer(settings, params, settings.scaled_learning_rate(world))
    # A prepared scheduler steps once per process on each update, hence the factors of ``world``.
    lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer=optimizer, num_warmup_steps=settings.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world, num_cycles=settings.lr_num_cycles, power=settings.lr_power)
    prepare = accelerator.prepare if shard_plan is None else functools.partial(prepare_sharded, accelerator)
    denoiser, optimizer, lr_scheduler = prepare(denoiser, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(denoiser)

    # ---- 7. Checkpoints hold the adapter file (not the base weights) plus accelerate's state -------
    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            save_adapter(Path(folder) / ADAPTER_FILENAME, adapter_from_model(model, config, metadata, component=backbone.denoiser_name))
        while weights:
            weights.pop()

    def load_hook(models, folder):
        saved = load_adapter(Path(folder) / ADAPTER_FILENAME)
        with torch.no_grad():
            for path, layer in adapter_layers(model):
                for name, value in layer.adapters["default"].tensors().items():
                    value.copy_(saved.layers[path][name])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    global_step = 0
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
            raise UserError(f"--resume_from_checkpoint: {resume_from} does not load ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                            "resume from an earlier checkpoint or start a new --output_dir") from None
        global_step = int(resume_from.name.split("-")[-1])
        logger.info("resumed from %s", resume_from)
    if accelerator.is_main_process and settings.report_to != "none":
        accelerator.init_trackers("qrlora", config={k: v for k, v in vars(settings).items() if isinstance(v, (int, float, str, bool))})

    def save_checkpoint(step: int) -> None:
        check_finite(params, f"checkpoint-{step}", output_dir)
        write_checkpoint(output_dir, step, lambda folder: accelerator.save_state(str(folder)), is_main=accelerator.is_main_process,
                         barrier=accelerator.wait_for_everyone, keep=settings.checkpoints_total_limit)

    # The run's records, once every input (the base weights too) checked out: a refused run leaves no folder.
    if accelerator.is_main_process:
        write_dataset_record(output_dir, dataset)
        write_config(settings, output_dir)  # the resolved settings: --config of it trains this run again

    # ---- 8. Train: one optimizer update per group of micro-batches ----------------------------------
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    if validation_loss is not None and global_step == 0:  # the base model's point: where the curve starts
        validation_loss.record(0, validation_loss(model, schedule, objective, accelerator.autocast), output_dir)
    denoiser.train()
    first_epoch, skip = divmod(global_step, updates_per_epoch)
    for epoch in range(first_epoch, num_epochs):
        batches = batches_of(epoch, accelerator.process_index)
        for group in update_groups(batches, settings.gradient_accumulation_steps)[skip:]:
            losses = []
            for micro, indices in enumerate(group):
                # Every draw of this micro-batch (timesteps, noise, latent sample) comes from its own generator.
                generator = step_generator(settings.seed, global_step, micro, accelerator.process_index, device)
                batch = collate([dataset[i] for i in indices])
                if empty_id is not None:
                    batch["prompt_ids"] = drop_captions(batch["prompt_ids"], len(indices), settings.caption_dropout_rate,
                                                        empty_id, settings.seed, global_step, micro, accelerator.process_index)
                last = micro == len(group) - 1
                with contextlib.nullcontext() if last or world == 1 else accelerator.no_sync(denoiser):
                    latents = batch_latents(backbone, encoders, batch, generator, model_dtype)
                    cond = backbone.batch_cond(cond_table, batch)
                    per_sample = backbone.training_loss(denoiser, latents, cond, schedule, objective, generator)
                    if settings.with_prior_preservation:
                        instance, prior = per_sample.chunk(2)
                        loss = instance.mean() + settings.prior_loss_weight * prior.mean()
                    else:
                        loss = per_sample.mean()
                    accelerator.backward(loss / len(group))  # the update's gradient is the mean over its micro-batches
                losses.append(loss.detach())
            update_loss = torch.stack(losses).mean()
            reduced = accelerator.reduce(update_loss, "mean") if world > 1 else update_loss
            if not torch.isfinite(reduced):
                kept = complete_checkpoints(output_dir)
                raise UserError(f"loss is {reduced.item()} at step {global_step + 1}; training stopped, "
                                f"last good checkpoint: {kept[-1] if kept else 'none (no checkpoint saved yet)'}")
            if settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            apply_constraints_(model)  # triu_deltaR: dR stays exactly upper-triangular
            global_step += 1
            progress.update(1)
            logs = {"loss": reduced.item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if validation_loss is not None and (global_step % settings.validation_steps == 0 or global_step >= max_steps):
                value = validation_loss(model, schedule, objective, accelerator.autocast)
                record = validation_loss.record(global_step, value, output_dir)
                logger.info("step %d: validation loss %.6f (best %.6f at step %d)", global_step, value,
                            record["best_loss"], record["best_step"])
                accelerator.log({"validation_loss": value}, step=global_step)
            if global_step % settings.checkpointing_steps == 0 and global_step < max_steps:
                save_checkpoint(global_step)
            if global_step >= max_steps:
                break
        skip = 0
        if validation_cond and accelerator.is_main_process and epoch % settings.validation_epochs == 0 and global_step < max_steps:
            run_validation(backbone, settings, model, encoders, scheduler, validation_cond, global_step, accelerator, model_dtype)

    # ---- 9. Final adapter file (main process only), last validation ---------------------------------
    accelerator.wait_for_everyone()
    final = output_dir / ADAPTER_FILENAME
    if accelerator.is_main_process:
        check_finite(params, "the final save", output_dir)
        adapter = adapter_from_model(model, config, metadata, component=backbone.denoiser_name)
        save_adapter(final, adapter)
        logger.info("saved %s", final)
        images = []
        if validation_cond:
            images = run_validation(backbone, settings, model, encoders, scheduler, validation_cond, global_step, accelerator, model_dtype)
        publish_run(settings, backbone, adapter, final, images, command, accelerator.device.type)
    accelerator.end_training()
    if run_lock is not None:
        run_lock.release()
    return final


BASE_ADAPTER = "base_adapter"  # the adapter name of --base_adapter on every layer it adapts


def load_base_adapter(path: str | None, backbone) -> AdapterFile | None:
    """``--base_adapter``'s file, read and checked before anything heavy loads (None without the flag).

    Raises:
        UserError: naming the flag and the file when it is unreadable or adapts another backbone's denoiser.
    """
    if path is None:
        return None
    adapter = load_adapter(path)
    if adapter.component != backbone.denoiser_name or (adapter.backbone and adapter.backbone != backbone.name):
        raise UserError(f"--base_adapter {path}: a {adapter.backbone or '?'} adapter of the {adapter.component}; "
                        f"this model is a {backbone.name} {backbone.denoiser_name}")
    return adapter


def attach_base_adapter(denoiser: torch.nn.Module, adapter: AdapterFile, path: str) -> None:
    """Attach ``--base_adapter`` at weight 1 with no trainable tensor, after checking it was trained on this base
    model (its recorded fingerprint against the weights of the layers it adapts)."""
    weights = {}
    for layer in adapter.layers:
        try:
            weights[layer] = denoiser.get_submodule(layer).weight
        except AttributeError:
            raise UserError(f"--base_adapter {path}: layer {layer} does not exist in this model") from None
    differs = fingerprint_difference(adapter.metadata.get("base_fingerprint"), base_fingerprint(weights))
    if differs:
        raise UserError(f"--base_adapter {path} was trained on another base model (the base weight of layer {differs} "
                        "differs)")
    attach_adapter(denoiser, adapter.config, adapter.layers, adapter_name=BASE_ADAPTER, trainable=False,
                   source=f"--base_adapter {path}")


def trained_prompts(examples: list[Example]) -> dict[str, str]:
    """``{where it came from: caption}`` of every distinct caption the run trains on (the prompt length check
    names the caption file, or the flag, of a caption a text encoder would cut)."""
    found: dict[str, str] = {}
    for example in examples:
        where = "--instance_prompt" if example.caption_source == FROM_INSTANCE_PROMPT else f"{example.caption_source} of {example.name}"
        if example.caption not in found.values():
            found[where] = example.caption
    return found


def most_common_caption(examples: list[Example]) -> str:
    """The caption most images share (the adapter file's ``instance_prompt`` when there is no instance prompt)."""
    captions = [e.caption for e in examples]
    return max(dict.fromkeys(captions), key=captions.count)


def write_dataset_record(output_dir: Path, dataset: DreamBoothDataset) -> Path:
    """``dataset.json`` in the run folder: every image, its caption as used, its repeats and bucket, the counts."""
    path = output_dir / DATASET_RECORD
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(dataset.record(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


DATASET_RECORD = "dataset.json"


def cast_floating(table: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors of a conditioning table in the denoiser's dtype (an all-bf16 base takes bf16 inputs)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in table.items()}


def run_validation(backbone, settings, model, encoders, scheduler, cond, step, accelerator, dtype) -> list[Path]:
    """Images of the validation prompt with the adapted denoiser, saved under ``output_dir/validation``; ``dtype``:
    the frozen base's dtype (``--base_precision``, else the mixed-precision dtype).

    Validation owns everything it mutates: a fresh scheduler built from the config (pipelines call
    ``set_timesteps`` on theirs), its own seeded generator, and a forked global RNG; training state is untouched.
    """
    was_training = model.training
    model.eval()
    own_scheduler = type(scheduler).from_config(scheduler.config)
    pipe = backbone.inference_pipeline(settings.pretrained_model_name_or_path, model, dtype=dtype, with_text=False,
                                       vae=encoders.vae(), scheduler=own_scheduler).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    folder = Path(settings.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    # The base may be stored below the mixed-precision dtype (``--base_precision bf16 --mixed_precision no``): the
    # pipeline's fp32 prompt embeddings, latents and VAE then meet bf16 weights, so validation autocasts to the
    # base's dtype, as training casts its inputs to it. With matching dtypes this is accelerate's own autocast.
    autocast = (torch.autocast(accelerator.device.type, dtype=dtype) if dtype != torch.float32
                else accelerator.autocast())
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
        for i in range(settings.num_validation_images):
            image = pipe(**backbone.pipeline_prompt_kwargs(*cond), height=settings.resolution, width=settings.resolution,
                         num_inference_steps=settings.validation_inference_steps, generator=generator).images[0]
            saved.append(folder / f"step{step:06d}_{i}.png")
            image.save(saved[-1])
    log_validation_images(accelerator.trackers, saved, step, settings.validation_prompt)
    del pipe
    model.train(was_training)
    return saved


def publish_run(settings, backbone, adapter, final: Path, images: list[Path], command: str, device: str) -> None:
    """After the final save: the kohya file (``--output_kohya_format``), the model card, the hub upload."""
    output_dir = final.parent
    kohya = None
    if settings.output_kohya_format:
        kohya = export_lora(adapter, kohya_path(final), "kohya", backbone.name)
        logger.info("saved %s", kohya)
    card = write_model_card(output_dir, adapter, adapter_name=final.name, pipeline_class=backbone.pipeline_class,
                            command=command, validation_prompt=settings.validation_prompt,
                            validation_images=[p.relative_to(output_dir).as_posix() for p in images],
                            kohya_name=kohya.name if kohya else None,
                            settings=card_snippet_settings(backbone.pipeline_cls(), mixed_precision=settings.mixed_precision, device=device,
                                                           resolution=settings.resolution,
                                                           max_sequence_length=settings.max_sequence_length or backbone.default_max_sequence_length))
    logger.info("saved %s", card)
    if settings.push_to_hub:
        url = push_run_folder(output_dir, settings.hub_model_id or output_dir.resolve().name, settings.hub_token)
        logger.info("pushed %s to %s", output_dir, url)

