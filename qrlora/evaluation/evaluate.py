"""CLIP-T, CLIP-I (style) and DINO (content) scores of generated images, per image and per merge cell.

The metrics the subject/style merging papers report (DreamBooth, Ruiz et al. 2023; ZipLoRA, Shah et al. 2023;
K-LoRA, Ouyang et al. 2025):

- **CLIP-T**: cosine between the CLIP image embedding and the CLIP text embedding of the prompt, with the
  concept tokens (``<c>``, ``<s>``, ``sks`` by default) removed, since CLIP never saw them;
- **CLIP-I style**: mean cosine between the CLIP image embedding and those of the style reference images;
- **DINO content**: mean cosine between the DINO CLS embedding and those of the content reference images.

Images come from folders holding a ``manifest.json`` (the merge CLIs and ``qrlora.evaluation.compare`` write one): a list of
``{"file", "prompt", "strategy", "method", "style_weight", "content_weight", "seed"}``. Results: ``scores.csv``
(one row per image), ``summary.json`` and ``summary.md`` (per cell = strategy, method, weight pair: mean and
standard error of each metric over the cell's images), and ``tradeoff.png`` (content score against style score,
one series per strategy).
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..training.data import list_images
from ..core.devices import resolve_device
from ..errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CONCEPT_TOKENS = "<c>,<s>,sks"


@dataclass(frozen=True)
class ScoringSettings:
    """What scores the images (the evaluation flags): the CLIP and DINO models, the reference folders, the tokens
    left out of CLIP-T prompts, the batch and the device (None: cuda if available, else cpu)."""

    style_refs: str | None = None
    content_refs: str | None = None
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    concept_tokens: str = DEFAULT_CONCEPT_TOKENS
    eval_batch_size: int = 16
    device: str | None = None

    def __post_init__(self):
        if isinstance(self.eval_batch_size, bool) or not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise UserError(f"--eval_batch_size must be a positive integer, got {self.eval_batch_size}")
MANIFEST = "manifest.json"
OUTPUT_FILES = ("scores.csv", "summary.json", "summary.md", "tradeoff.png")
METRICS = ("clip_t", "clip_i_style", "dino_content")


# ---------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ImageRecord:
    """One generated image and how it was made (a row of ``manifest.json``)."""

    file: str
    prompt: str
    strategy: str = "direct"
    method: str = ""
    style_weight: float | None = None
    content_weight: float | None = None
    seed: int | None = None


def write_manifest(folder: str | Path, records: Sequence[ImageRecord]) -> Path:
    """Write ``folder/manifest.json`` (file names relative to ``folder``)."""
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    return path


def read_manifest(folder: str | Path) -> list[tuple[Path, ImageRecord]]:
    """``(image path, record)`` for every image listed in ``folder/manifest.json``.

    Raises:
        UserError: naming the folder or file when the folder, its manifest or a listed image is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images: folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"--images: {folder} has no {MANIFEST} (the merge CLIs write one; see docs/merging.md, 'Comparing merge methods')")
    try:
        rows = json.loads(path.read_text())
        records = [ImageRecord(**row) for row in rows]
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: not a manifest (a JSON list of {{file, prompt, ...}}): {str(err).splitlines()[0]}") from None
    if not records:
        raise UserError(f"--images: {path} lists no images")
    out = []
    for record in records:
        image = folder / record.file
        if not image.is_file():
            raise UserError(f"{path}: lists {record.file}, which is not in {folder}")
        out.append((image, record))
    return out


# ---------------------------------------------------------------------------------------------------------
# Embedding models (transformers' own classes and image processors)
# ---------------------------------------------------------------------------------------------------------
def load_model(flag: str, name: str, loader):
    """``loader(name)``, or a ``UserError`` naming ``flag`` when the model cannot be found or read."""
    try:
        return loader(name)
    except Exception as err:  # hub and file errors come in many types; all mean "cannot load this model"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{flag}: cannot load {name} (not a local model folder, not in the hub cache: {reason[:160]})") from None


def _pooled(output) -> torch.Tensor:
    """``get_*_features`` return a tensor (transformers 4) or an output whose ``pooler_output`` is the projection (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Embedder:
    """Unit-norm image (and, for CLIP, text) embeddings from a transformers model, batched, on one device."""

    def __init__(self, kind: str, name: str, flag: str, device: str, batch_size: int):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.kind, self.name, self.device, self.batch_size = kind, name, device, batch_size
        self.model = load_model(flag, name, AutoModel.from_pretrained).to(device).eval()
        self.processor = load_model(flag, name, AutoImageProcessor.from_pretrained)
        self.tokenizer = load_model(flag, name, AutoTokenizer.from_pretrained) if kind == "clip" else None
        if kind == "clip" and not hasattr(self.model, "get_image_features"):
            raise UserError(f"{flag}: {name} is a {type(self.model).__name__}, not a CLIP model")

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image], desc: str) -> torch.Tensor:
        """(N, D) float32 unit vectors; CLIP: the projected image embedding, DINO: the last layer's CLS token."""
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc=desc, unit="batch", leave=False):
            batch = self.processor(images=list(images[start:start + self.batch_size]), return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.model.dtype)
            if self.kind == "clip":
                feats = _pooled(self.model.get_image_features(pixel_values=pixels))
            else:
                feats = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 unit CLIP text embeddings (prompts truncated to the tokenizer's context length)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True, return_tensors="pt")
            feats = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                         attention_mask=tokens["attention_mask"].to(self.device)))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)


def clip_prompt(prompt: str, concept_tokens: Sequence[str]) -> str:
    """The prompt CLIP-T scores against: concept tokens removed, spaces collapsed (``a <c> cat`` -> ``a cat``)."""
    for token in concept_tokens:
        if token:
            prompt = re.sub(rf"(?<![\w<]){re.escape(token)}(?![\w>])", " ", prompt)
    return " ".join(prompt.split())


# ---------------------------------------------------------------------------------------------------------
# Scores and summaries
# ---------------------------------------------------------------------------------------------------------
def score_images(entries: Sequence[tuple[Path, ImageRecord]], clip: Embedder | None, dino: Embedder | None, *,
                 style_refs: Sequence[Image.Image] = (), content_refs: Sequence[Image.Image] = (),
                 concept_tokens: Sequence[str] = ()) -> list[dict]:
    """One row per image: its record, the CLIP prompt, and every metric that has its model and references."""
    images = [Image.open(path).convert("RGB") for path, _ in entries]
    rows = [{**asdict(record), "clip_prompt": clip_prompt(record.prompt, concept_tokens)} for _, record in entries]
    if clip is not None:
        gen = clip.images(images, "CLIP images")
        text = clip.texts([row["clip_prompt"] for row in rows])
        for row, value in zip(rows, (gen * text).sum(-1).tolist()):
            row["clip_t"] = value
        if style_refs:
            # Mean cosine to the references = dot with the mean of the unit reference embeddings.
            refs = clip.images(style_refs, "CLIP style references")
            for row, value in zip(rows, (gen @ refs.T).mean(-1).tolist()):
                row["clip_i_style"] = value
    if dino is not None and content_refs:
        gen = dino.images(images, "DINO images")
        refs = dino.images(content_refs, "DINO content references")
        for row, value in zip(rows, (gen @ refs.T).mean(-1).tolist()):
            row["dino_content"] = value
    return rows


def _cell_key(row: dict) -> tuple:
    return row["strategy"], row["method"], row["style_weight"], row["content_weight"]


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per cell (strategy, method, style weight, content weight): ``n`` and, per metric, mean and standard error.

    The standard error is the sample standard deviation over sqrt(n); ``None`` when the cell holds one image.
    """
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(_cell_key(row), []).append(row)
    out = []
    for (strategy, method, style_w, content_w), members in cells.items():
        cell = {"strategy": strategy, "method": method, "style_weight": style_w, "content_weight": content_w, "n": len(members)}
        for metric in METRICS:
            values = np.array([m[metric] for m in members if metric in m], dtype=np.float64)
            if len(values):
                cell[f"{metric}_mean"] = float(values.mean())
                cell[f"{metric}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
        out.append(cell)
    return out


def _fmt(cell: dict, metric: str) -> str:
    mean = cell.get(f"{metric}_mean")
    if mean is None:
        return "-"
    se = cell.get(f"{metric}_se")
    return f"{mean:.4f}" if se is None else f"{mean:.4f} ± {se:.4f}"


def markdown_table(cells: Sequence[dict]) -> str:
    """The comparison table: one row per cell, mean ± standard error per metric."""
    weight = lambda w: "-" if w is None else f"{w:g}"  # noqa: E731
    lines = ["| strategy | method | style w | content w | n | CLIP-T | CLIP-I style | DINO content |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['strategy']} | {c['method']} | {weight(c['style_weight'])} | {weight(c['content_weight'])} | "
                     f"{c['n']} | {_fmt(c, 'clip_t')} | {_fmt(c, 'clip_i_style')} | {_fmt(c, 'dino_content')} |")
    return "\n".join(lines) + "\n"


def tradeoff_plot(cells: Sequence[dict], path: Path) -> Path | None:
    """Content score (DINO) against style score (CLIP-I), one series per strategy; None without both metrics."""
    points = [c for c in cells if c.get("clip_i_style_mean") is not None and c.get("dino_content_mean") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for strategy in dict.fromkeys(c["strategy"] for c in points):
        series = [c for c in points if c["strategy"] == strategy]
        x = [c["clip_i_style_mean"] for c in series]
        y = [c["dino_content_mean"] for c in series]
        ax.errorbar(x, y, xerr=[c["clip_i_style_se"] or 0.0 for c in series], yerr=[c["dino_content_se"] or 0.0 for c in series],
                    fmt="o", capsize=3, label=strategy)
        for c, xi, yi in zip(series, x, y):
            if c["style_weight"] is not None and c["content_weight"] is not None:
                ax.annotate(f"s{c['style_weight']:g} c{c['content_weight']:g}", (xi, yi), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("style score: CLIP-I to style references")
    ax.set_ylabel("content score: DINO to content references")
    ax.set_title("content / style trade-off per merge strategy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: Sequence[dict], cells: Sequence[dict], output_dir: str | Path) -> list[Path]:
    """``scores.csv``, ``summary.json``, ``summary.md`` and (with both image metrics) ``tradeoff.png``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(cells, indent=1) + "\n")
    (out / "summary.md").write_text(markdown_table(cells))
    written = [out / "scores.csv", out / "summary.json", out / "summary.md"]
    plot = tradeoff_plot(cells, out / "tradeoff.png")
    return written + ([plot] if plot else [])


# ---------------------------------------------------------------------------------------------------------
# The command (its flags: qrlora.cli.evaluate)
# ---------------------------------------------------------------------------------------------------------
def load_references(folder: str | None, flag: str) -> list[Image.Image]:
    return list_images(folder, flag) if folder else []


def evaluate_folders(folders: Sequence[str], scoring: ScoringSettings, output_dir: str | Path) -> list[Path]:
    """Score every image of ``folders`` (each with a manifest) and write the results into ``output_dir``."""
    entries = [entry for folder in folders for entry in read_manifest(folder)]
    style_refs = load_references(scoring.style_refs, "--style_refs")
    content_refs = load_references(scoring.content_refs, "--content_refs")
    device = str(resolve_device(scoring.device))
    clip = Embedder("clip", scoring.clip_model, "--clip_model", device, scoring.eval_batch_size)
    dino = Embedder("dino", scoring.dino_model, "--dino_model", device, scoring.eval_batch_size) if content_refs else None
    rows = score_images(entries, clip, dino, style_refs=style_refs, content_refs=content_refs,
                        concept_tokens=[t.strip() for t in scoring.concept_tokens.split(",")])
    return write_results(rows, summarize(rows), output_dir)


def check_output_dir(output_dir: str | Path, overwrite: bool) -> None:
    """Refuse to replace an earlier evaluation's results unless ``--overwrite``."""
    existing = [name for name in OUTPUT_FILES if (Path(output_dir) / name).exists()]
    if existing and not overwrite:
        raise UserError(f"--output_dir: {output_dir} already holds {existing[0]}; pass --overwrite or choose a new folder")
