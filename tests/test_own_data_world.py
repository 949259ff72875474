"""Per-image captions in the CPU world (issue 29): one adapter trained on a mixed folder of content images (the held-out
heart, flat) and style images (circles in the held-out checker style), each with its own sidecar caption, renders each
concept on its own caption, read by the world's classifier over several seeds; the same images under one instance
prompt cannot tell the two captions apart."""
from __future__ import annotations

import shutil

import pytest

from qrlora.toy.world import data
from qrlora.toy.world.world import CONTENT_STYLE, STYLE_SHAPE, load_world, sample_images, write_instance_images

SEEDS = list(range(8))
STEPS = 100


def _folder(root, captions: bool):
    folder = root / ("captioned" if captions else "one_prompt")
    folder.mkdir()
    for shape, style in ((data.HELD_OUT_SHAPE, CONTENT_STYLE), (STYLE_SHAPE, data.HELD_OUT_STYLE)):
        images = write_instance_images(root / f"{shape}-{style}-{captions}", shape, style, count=4, seed=1)
        for image in sorted(images.glob("*.png")):
            target = folder / f"{shape}_{image.name}"
            shutil.copy(image, target)
            if captions:
                target.with_suffix(".txt").write_text(data.caption(shape, style))
    return folder


def _train(world, folder, out, instance_prompt=None):
    from accelerate.state import AcceleratorState

    from qrlora.training import trainer
    from qrlora.training.settings import TrainSettings

    settings = TrainSettings(pretrained_model_name_or_path=str(world.path), instance_data_dir=str(folder),
                             instance_prompt=instance_prompt, output_dir=str(out), lora_init_method="lora", rank=4,
                             max_train_steps=STEPS, learning_rate=1e-2, train_batch_size=4, cache_latents=True,
                             checkpointing_steps=STEPS + 1, **world.trainer_settings())
    try:
        return trainer.train(settings, settings.command())
    finally:
        AcceleratorState._reset_state()


def _rates(world, adapter_path):
    """(heart rate on the heart's caption, checker rate on the circle's caption) over SEEDS."""
    from diffusers import StableDiffusion3Pipeline

    from qrlora.core.inject import attach_adapter
    from qrlora.files.checkpoint import load_adapter

    adapter = load_adapter(adapter_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(world.path)
    attach_adapter(pipe.transformer, adapter.config, adapter.layers)
    pipe.set_progress_bar_config(disable=True)
    heart = data.caption(data.HELD_OUT_SHAPE, CONTENT_STYLE)
    circle = data.caption(STYLE_SHAPE, data.HELD_OUT_STYLE)
    images = sample_images(pipe, [heart] * len(SEEDS) + [circle] * len(SEEDS), SEEDS + SEEDS, world.max_sequence_length)
    return (world.rates(images[:len(SEEDS)], shape=data.HELD_OUT_SHAPE)["shape"],
            world.rates(images[len(SEEDS):], style=data.HELD_OUT_STYLE)["style"])


@pytest.mark.slow
def test_each_image_trains_on_its_own_caption_in_the_world(tmp_path):
    world = load_world()
    captioned = _rates(world, _train(world, _folder(tmp_path, True), tmp_path / "run_captioned"))
    one_prompt = _rates(world, _train(world, _folder(tmp_path, False), tmp_path / "run_one",
                                      instance_prompt=data.caption(data.HELD_OUT_SHAPE, CONTENT_STYLE)))
    print("captioned (heart on its caption, checker on its caption):", captioned, "one prompt:", one_prompt)
    # Each concept on its own caption (the base world renders neither: both are held out of its training)...
    assert captioned[0] >= 0.5 and captioned[1] >= 0.5, captioned
    # ...where one prompt for all images puts hearts and checker circles behind one caption: its own caption renders
    # a mix (few hearts), and the circle's caption, never seen in training, gets no checker from it.
    assert captioned[0] - one_prompt[0] >= 0.375 and captioned[1] - one_prompt[1] >= 0.375, (captioned, one_prompt)
