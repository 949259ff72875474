"""The world's evaluator: a small CNN with a shape head and a style head over every shape and style (held-out too).

It is trained on freshly rendered images (``qrlora.toy.world.data``) with augmentations that mimic what a small latent
diffusion model gets wrong (blur, noise, a pixel or two of shift), so its verdict on generated images measures the
shape and style and not the sharpness.  Accuracy is measured on renders from a seed range never trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ...errors import UserError
from .optim import warmup_cosine
from .data import IMAGE_SIZE, SHAPES, STYLES, balanced_pairs, render_set, to_tensor

CLASSIFIER_FILE = "classifier.safetensors"


class WorldClassifier(nn.Module):
    """Six 3x3 convs (32 -> 16 -> 8 -> 4 px, widths w, 2w, 4w), global average pool, two linear heads.

    Input (B, 3, 32, 32) in [-1, 1]; output a pair of logits (B, num_shapes), (B, num_styles).
    """

    def __init__(self, num_shapes: int = len(SHAPES), num_styles: int = len(STYLES), width: int = 32):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, width, 2 * width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if cout == cin:  # after each pair of convs: halve the side
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(cin, num_shapes)
        self.style_head = nn.Linear(cin, num_styles)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))  # (B, 4w)
        return self.shape_head(h), self.style_head(h)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random per-image blur (sigma 0..1.2 px), shift (+-2 px) and noise (std 0..0.08) of (B, 3, H, W) in [-1, 1]."""
    b = x.shape[0]
    # Gaussian blur as a depthwise 5x5 conv, one sigma per image (sigma ~ 0 leaves the image as it is).
    sigma = torch.rand(b, generator=gen) * 1.2 + 1e-3
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (B, 5)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3B, 1, 5, 5)
    x = F.conv2d(F.pad(x.reshape(1, 3 * b, *x.shape[2:]), (2, 2, 2, 2), mode="replicate"), k2, groups=3 * b)
    x = x.reshape(b, 3, *x.shape[2:])
    dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.08


def train_classifier(seed: int = 0, steps: int = 800, batch_size: int = 64, per_pair: int = 150,
                     progress: bool = True) -> tuple[WorldClassifier, dict]:
    """Train on ``per_pair`` renders of every (shape, style) pair; return the model (eval mode) and its accuracy
    on 20 fresh renders per pair (seeds disjoint from training: base seed ``seed + 1_000_000``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = balanced_pairs(SHAPES, STYLES, per_pair)
    images = to_tensor(render_set(pairs, base_seed=seed))  # (N, 3, 32, 32)
    shape_y = torch.tensor([SHAPES.index(s) for s, _ in pairs])
    style_y = torch.tensor([STYLES.index(t) for _, t in pairs])
    model = WorldClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, warmup=steps // 10, floor=0.02)
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress, position=1, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(pairs), (batch_size,), generator=gen)
        shape_logits, style_logits = model(augment(images[idx], gen))
        loss = F.cross_entropy(shape_logits, shape_y[idx]) + F.cross_entropy(style_logits, style_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    test_pairs = balanced_pairs(SHAPES, STYLES, 20)
    shapes, styles = predict(model, render_set(test_pairs, base_seed=seed + 1_000_000))
    accuracy = {
        "shape_accuracy": float(np.mean([p == s for p, (s, _) in zip(shapes, test_pairs)])),
        "style_accuracy": float(np.mean([p == t for p, (_, t) in zip(styles, test_pairs)])),
        "test_images": len(test_pairs),
        "train_steps": steps,
    }
    return model, accuracy


@torch.no_grad()
def predict(model: WorldClassifier, images) -> tuple[list[str], list[str]]:
    """Predicted (shape names, style names) of images: (N, H, W, 3) uint8 array, or a list of PIL images."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))) for im in images])
    x = to_tensor(images)
    shapes, styles = [], []
    for chunk in x.split(256):
        shape_logits, style_logits = model(chunk)
        shapes += [SHAPES[i] for i in shape_logits.argmax(1).tolist()]
        styles += [STYLES[i] for i in style_logits.argmax(1).tolist()]
    return shapes, styles


def save_classifier(model: WorldClassifier, path: Path) -> None:
    """Weights as safetensors; the class names ride in its metadata so a reader can check them.

    One metadata key: safetensors writes its metadata map in no fixed order, and two keys made two builds of the
    same seed differ in bytes though not in weights.
    """
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(path), metadata={"classes": json.dumps({"shapes": SHAPES, "styles": STYLES})})


def load_classifier(path: Path) -> WorldClassifier:
    """The classifier saved by ``save_classifier`` (eval mode); a missing or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no world classifier here (build the world with `python -m qrlora.world build`)")
    model = WorldClassifier()
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UserError(f"{path}: not a world classifier (keys differ from qrlora.toy.world.classifier.WorldClassifier)")
    return model.eval()
