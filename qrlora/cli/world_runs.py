"""The world's adapters and renders: ``train_adapter`` runs the real trainer on a world with typed
``TrainSettings``, ``render_settings`` is how ``MergedPipeline`` renders one. Shared by ``python -m qrlora.world
experiment`` (:mod:`.world`) and ``study`` (:mod:`.world_study`)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..merging.settings import RenderSettings
from ..training import trainer
from ..training.settings import TrainSettings
from ..toy.world import data
from ..toy.world.experiment import LR_FACTOR
from ..toy.world.world import CONTENT_STYLE, SAMPLE_GUIDANCE, SAMPLE_STEPS, STYLE_SHAPE, World, write_instance_images


def train_adapter(world: World, method: str, role: str, output_dir: Path, *, steps: int, lr: float, rank: int = 4,
                  seed: int = 0, experts: int = 2, overrides: Mapping[str, object] | None = None) -> Path:
    """Train the ``role`` ("content" or "style") adapter of ``method`` with the real trainer; return its file.

    The 4 instance images are rendered into ``output_dir/images`` (seeded by ``seed``); the run folder is
    ``output_dir/run``. ``overrides`` (``TrainSettings`` fields: batch size, targets, basis controls, ...) come last.
    """
    from accelerate.state import AcceleratorState

    shape, style = (world.new_shape, CONTENT_STYLE) if role == "content" else (STYLE_SHAPE, world.new_style)
    images = write_instance_images(output_dir / "images", shape, style, count=4, seed=seed)
    fields = dict(
        pretrained_model_name_or_path=str(world.path), instance_data_dir=str(images),
        instance_prompt=data.caption(shape, style), output_dir=str(output_dir / "run"), lora_init_method=method,
        rank=rank, moe_num_experts=experts, max_train_steps=steps, learning_rate=lr * LR_FACTOR.get(method, 1.0),
        train_batch_size=4, cache_latents=True, seed=seed, checkpointing_steps=steps + 1, **world.trainer_settings())
    settings = TrainSettings(**{**fields, **(overrides or {})})
    try:
        return trainer.train(settings, settings.command())
    finally:
        AcceleratorState._reset_state()  # accelerate keeps one global state per process


def render_settings(world: World, seed: int = 0) -> RenderSettings:
    """How ``MergedPipeline`` renders this world: its size, T5 length, sampling steps and guidance, on the CPU."""
    return RenderSettings(num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed,
                          height=world.resolution, width=world.resolution,
                          max_sequence_length=world.max_sequence_length, device="cpu", dtype="fp32")
