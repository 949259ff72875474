"""A built world on disk: its spec (``world.json``), its classifier, and the helpers every user of it shares
(instance images for adapters, sampling through the real pipeline, classifier rates)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import UserError
from . import data
from .classifier import CLASSIFIER_FILE, WorldClassifier, load_classifier, predict

WORLD_FILE = "world.json"
SHIPPED_WORLD = Path(__file__).resolve().parents[3] / "assets" / "world"  # built once, committed; never rebuilt by tests
CONTENT_STYLE = "flat"  # the content adapter's images: the held-out shape in this seen style
STYLE_SHAPE = "circle"  # the style adapter's images: this seen shape in the held-out style


# How every world is sampled: when it is built (its own check) and measured (experiment, study, demo).
SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 4.0

# FLUX.1-dev's published adapters: rank 64 on width 3072. A world's "flux-ratio" rank keeps r / width the same,
# so a study can ask whether the rank-to-width ratio (not the absolute rank) decides how adapters merge.
FLUX_RANK, FLUX_WIDTH = 64, 3072


def flux_ratio_rank(width: int) -> int:
    """The adapter rank with FLUX's r / width (64 / 3072) on a transformer of ``width``; at least 1."""
    return max(1, round(width * FLUX_RANK / FLUX_WIDTH))


@dataclass
class World:
    """A built world folder (an SD3 diffusers pipeline + ``classifier.safetensors`` + ``world.json``)."""

    path: Path
    record: dict
    classifier: WorldClassifier

    @property
    def max_sequence_length(self) -> int:
        """The T5 prompt length the denoiser was trained with; every tool needs ``--max_sequence_length`` = this."""
        return int(self.record["max_sequence_length"])

    @property
    def resolution(self) -> int:
        return int(self.record["image_size"])

    @property
    def new_shape(self) -> str:
        return self.record["held_out_shape"]

    @property
    def new_style(self) -> str:
        return self.record["held_out_style"]

    @property
    def flux_ratio_rank(self) -> int:
        """The adapter rank with FLUX.1-dev's r / width (64 / 3072) on this world's transformer."""
        return int(self.record.get("rank_targets", {}).get("flux_ratio") or flux_ratio_rank(self.record["settings"]["width"]))

    def trainer_settings(self) -> dict:
        """The ``TrainSettings`` fields this world needs whatever the adapter: its resolution and T5 length."""
        return {"resolution": self.resolution, "max_sequence_length": self.max_sequence_length}

    def classify(self, images) -> tuple[list[str], list[str]]:
        """(shapes, styles) the classifier sees in (N, H, W, 3) uint8 images or a list of PIL images."""
        return predict(self.classifier, images)

    def rates(self, images, shape: str | None = None, style: str | None = None) -> dict:
        """Fractions of ``images`` classified as ``shape``, as ``style``, and as both (None: not measured)."""
        shapes, styles = self.classify(images)
        out = {}
        if shape is not None:
            out["shape"] = float(np.mean([s == shape for s in shapes]))
        if style is not None:
            out["style"] = float(np.mean([t == style for t in styles]))
        if shape is not None and style is not None:
            out["both"] = float(np.mean([s == shape and t == style for s, t in zip(shapes, styles)]))
        return out


def load_world(path: str | Path = SHIPPED_WORLD, flag: str = "--world") -> World:
    """Open a built world; a folder that is not one ends in a one-line ``UserError`` naming ``flag``."""
    path = Path(path)
    try:
        record = json.loads((path / WORLD_FILE).read_text())
    except (OSError, ValueError):
        raise UserError(f"{flag}: {path} is not a built world (no readable {WORLD_FILE}; "
                        "build one with `python -m qrlora.world build --output DIR`)") from None
    if record.get("format") != "qrlora-world":
        raise UserError(f"{flag}: {path / WORLD_FILE} is not a qrlora world record")
    return World(path, record, load_classifier(path / CLASSIFIER_FILE))


def sample_images(pipe, prompts: list[str], seeds: list[int], max_sequence_length: int, *, steps: int = SAMPLE_STEPS,
                  guidance: float = SAMPLE_GUIDANCE, batch: int = 64, progress: bool = False, **call_kwargs) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for prompt i from seed i, through the real pipeline call, ``batch`` at a time.

    ``call_kwargs`` go to the pipeline call (a merge strategy's step callback, for one).
    """
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), batch), desc="sampling", leave=False, disable=not progress):
        p, s = prompts[start:start + batch], seeds[start:start + batch]
        with torch.no_grad():
            images = pipe(prompt=p, generator=[torch.Generator().manual_seed(x) for x in s], num_inference_steps=steps,
                          guidance_scale=guidance, max_sequence_length=max_sequence_length, output_type="np",
                          **call_kwargs).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def write_instance_images(folder: str | Path, shape: str, style: str, count: int = 4, seed: int = 0) -> Path:
    """Render ``count`` training images of (shape, style) as PNGs into ``folder`` (created); return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = data.render_set([(shape, style)] * count, base_seed=seed + 5_000_000)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{shape}_{style}_{i}.png")
    return folder
