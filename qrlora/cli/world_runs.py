"""The world's adapters and renders through the real commands: ``train_adapter`` runs the trainer's CLI on a
world, ``render_settings`` is how ``MergedPipeline`` renders one. Shared by ``python -m qrlora.world
experiment`` (:mod:`.world`) and ``study`` (:mod:`.world_study`)."""
from __future__ import annotations

from pathlib import Path

from ..merging.settings import RenderSettings
from ..toy.world import data
from ..toy.world.experiment import LR_FACTOR
from ..toy.world.world import CONTENT_STYLE, SAMPLE_GUIDANCE, SAMPLE_STEPS, STYLE_SHAPE, World, write_instance_images


def train_adapter(world: World, method: str, role: str, output_dir: Path, *, steps: int, lr: float, rank: int = 4,
                  seed: int = 0, experts: int = 2, extra: list[str] = ()) -> Path:
    """Train the ``role`` ("content" or "style") adapter of ``method`` through ``qrlora.training.trainer``; return its file.

    The 4 instance images are rendered into ``output_dir/images`` (seeded by ``seed``); the run folder is
    ``output_dir/run``. ``extra`` trainer flags come last and override the defaults here (batch size, ...).
    """
    from accelerate.state import AcceleratorState

    from .train import main as train_main

    shape, style = (world.new_shape, CONTENT_STYLE) if role == "content" else (STYLE_SHAPE, world.new_style)
    images = write_instance_images(output_dir / "images", shape, style, count=4, seed=seed)
    try:
        return train_main([
            "--pretrained_model_name_or_path", str(world.path), "--instance_data_dir", str(images),
            "--instance_prompt", data.caption(shape, style), "--output_dir", str(output_dir / "run"),
            "--lora_init_method", method, "--rank", str(rank), "--moe_num_experts", str(experts),
            "--max_train_steps", str(steps), "--learning_rate", str(lr * LR_FACTOR.get(method, 1.0)),
            "--train_batch_size", "4", "--cache_latents", "--seed", str(seed),
            "--checkpointing_steps", str(steps + 1), *world.trainer_flags(), *extra,
        ])
    finally:
        AcceleratorState._reset_state()  # accelerate keeps one global state per process


def render_settings(world: World, seed: int = 0) -> RenderSettings:
    """How ``MergedPipeline`` renders this world: its size, T5 length, sampling steps and guidance, on the CPU."""
    return RenderSettings(num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, seed=seed,
                          height=world.resolution, width=world.resolution,
                          max_sequence_length=world.max_sequence_length, device="cpu", dtype="fp32")
