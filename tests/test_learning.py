"""Proof of learning (docs/ARCHITECTURE.md s. 3a): every backbone x every method learns its one training image.

Each run trains on one image with validation on, as the wrappers run it (validation after the first epoch,
i.e. after step 1 for one image: the moment the old shared scheduler corrupted the noise table). The score is
the fixed-noise evaluation loss (``qrlora.toy.fitprobe``) on that image, read back from the saved adapter file
and, for static methods, also through the exported standard LoRA in diffusers' own ``load_lora_weights``.

Threshold: adapted / base <= 0.95. Measured on the tiny pipelines with these settings, every method reached
0.82-0.88 on SD3, 0.75-0.85 on FLUX and 0.87-0.91 on SDXL, with a seed-to-seed spread of at most 0.011
(bench/convergence.py; re-measure whenever the tiny models change). A run that learns nothing scores exactly 1.0
(zero-initialised coefficients leave the base bit-identical), which ``test_a_run_that_learns_nothing_fails_the_check``
shows the check rejects.
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import run_script
from qrlora.files.checkpoint import ADAPTER_FILENAME
from qrlora.toy.fitprobe import FitProbe
from qrlora.core.methods import METHODS, get_method

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`

IMAGE_DIR = "assets/sty/swirl_painting"
PROMPT = "a landscape in <s> style"
RESOLUTION = 64
MAX_RATIO = 0.95
SETTINGS = {  # backbone: (steps, learning rate, extra flags)
    "sd3": (200, 2e-2, []),
    "flux": (200, 2e-2, ["--max_sequence_length", "16"]),
    "sdxl": (300, 3e-2, ["--mixed_precision", "no"]),
}
_PROBES: dict[str, FitProbe] = {}


def probe_for(backbone: str, model_dir) -> FitProbe:
    if backbone not in _PROBES:
        extra = SETTINGS[backbone][2]
        length = int(extra[extra.index("--max_sequence_length") + 1]) if "--max_sequence_length" in extra else None
        _PROBES[backbone] = FitProbe(model_dir, IMAGE_DIR, PROMPT, resolution=RESOLUTION, max_sequence_length=length)
    return _PROBES[backbone]


def train_one_image(model_dir, backbone, method, out, learning_rate=None, steps=None):
    from accelerate.state import AcceleratorState

    from qrlora.cli.train import main

    default_steps, default_lr, extra = SETTINGS[backbone]
    rank = 8 if not get_method(method).static else 4  # moe: 2 experts of 4 directions each
    try:
        return main([
            "--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", IMAGE_DIR,
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--rank", str(rank), "--lora_init_method", method,
            "--moe_num_experts", "2", "--resolution", str(RESOLUTION), "--max_train_steps", str(steps or default_steps),
            "--learning_rate", str(default_lr * get_method(method).lr_factor if learning_rate is None else learning_rate),
            "--validation_prompt", "a cat in <s> style", "--validation_epochs", "250",
            "--num_validation_images", "1", "--validation_inference_steps", "2", *extra,
        ])
    finally:
        AcceleratorState._reset_state()


def learned_ratio(probe: FitProbe, adapter_path) -> float:
    return probe.loss(probe.adapted_denoiser(adapter_path)) / probe.loss()


def diffusers_ratio(probe: FitProbe, model_dir, adapter_path, tmp_path) -> float:
    """The same score through the exported standard LoRA, loaded by the pipeline's own ``load_lora_weights``."""
    import diffusers

    exported = tmp_path / "exported_lora.safetensors"
    run_script([sys.executable, "-m", "qrlora.export", str(adapter_path), str(exported)])
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(exported))
    return probe.loss(getattr(pipe, probe.backbone.denoiser_name).eval()) / probe.loss()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backbone", list(SETTINGS))
def test_every_method_learns_its_image_on_every_backbone(request, backbone, method, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{backbone}")
    final = train_one_image(model_dir, backbone, method, tmp_path / "run")
    assert list((tmp_path / "run" / "validation").glob("step000001_*.png")), "validation did not run after step 1"
    probe = probe_for(backbone, model_dir)
    ratio = learned_ratio(probe, final)
    assert ratio <= MAX_RATIO, f"{backbone}/{method}: evaluation loss only fell to {ratio:.3f} of the base"
    if get_method(method).static:
        through_diffusers = diffusers_ratio(probe, model_dir, final, tmp_path)
        assert through_diffusers == pytest.approx(ratio, rel=2e-3), "the exported LoRA scores differently in diffusers"


def test_a_run_that_learns_nothing_fails_the_check(tiny_sd3, tmp_path):
    # The trainer refuses --learning_rate 0; 1e-12 moves no coefficient measurably.
    final = train_one_image(tiny_sd3, "sd3", "triu_deltaR", tmp_path / "run", learning_rate=1e-12, steps=5)
    assert final.name == ADAPTER_FILENAME
    assert learned_ratio(probe_for("sd3", tiny_sd3), final) > MAX_RATIO
