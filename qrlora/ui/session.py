"""What the merge explorer does, without the web page: one request (the page's state, typed), the merged pipeline
it renders through, the world's verdict on an image, the pair's similarity heatmap, the saved merge and the command
line that reproduces each.

Every merge goes through the library the merge CLIs use: ``load_adapter`` (the one validating reader),
``MergedPipeline`` with the strategies of ``qrlora.merging.strategies`` (``roles`` as ``python -m qrlora.merge``
gives them: content first), ``RenderSettings`` / ``StrategySettings`` (checked, naming the flag), the world's
classifier (``qrlora.toy.world``) and ``pair_similarity`` (``qrlora.evaluation.analysis``). The flags of the
reproducing command are the settings' own field names, so the command and the render cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from ..errors import UserError
from ..files.checkpoint import ADAPTER_FILENAME, AdapterFile, load_adapter
from ..files.outputs import check_writable
from ..files.runs import Run, find_runs
from ..merging.inference import MergedPipeline, label_grid, merged_size_estimate
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from ..toy.world.world import SAMPLE_GUIDANCE, SAMPLE_STEPS, World, load_world

PREVIEW = 256  # px: images smaller than this (the world's 32 px) are shown upscaled (nearest) so a person sees them


@dataclass(frozen=True)
class MergeRequest:
    """The explorer's state: which pair, on which base model, merged how, rendered how."""

    model_path: str
    content: str  # an adapter file or a run folder holding one
    style: str
    strategy: str = "direct"
    content_weight: float = 1.0
    style_weight: float = 1.0
    render: RenderSettings = field(default_factory=RenderSettings)
    settings: StrategySettings = field(default_factory=StrategySettings)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"--merge_strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not str(self.model_path).strip():
            raise UserError("--model_path: choose a base model (a hub id, a pipeline folder, a tiny pipeline or the world)")


def adapter_file(path: str, role: str) -> Path:
    """The adapter file a path names: the file itself, or ``pytorch_lora_weights.safetensors`` in a run folder."""
    if not str(path).strip():
        raise UserError(f"{role} adapter: choose a run or paste the path of an adapter file or run folder")
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / ADAPTER_FILENAME
        if not p.is_file():
            raise UserError(f"{role} adapter: {p.parent} is a folder without {ADAPTER_FILENAME} (not a finished run)")
    elif not p.exists():
        raise UserError(f"{role} adapter: {p} does not exist (no such run folder or adapter file)")
    return p


def _flags(values, defaults) -> list[str]:
    """``--name value`` for every field of a settings dataclass that differs from its default."""
    out = []
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if value != getattr(defaults, f.name) and value is not None:
            out += [f"--{f.name}", str(value)]
    return out


def _strategy_flags(request: MergeRequest) -> list[str]:
    return ["--merge_strategy", request.strategy, *_flags(request.settings, StrategySettings())]


def merge_command(request: MergeRequest, output_dir: str, save_merged: str | None = None) -> str:
    """The ``python -m qrlora.merge`` line that renders (or, with ``save_merged``, saves) what the explorer shows."""
    argv = ["python", "-m", "qrlora.merge", "--model_path", request.model_path,
            "--adapters", str(adapter_file(request.content, "content")), str(adapter_file(request.style, "style")),
            "--weights", f"{request.content_weight:g},{request.style_weight:g}", *_strategy_flags(request),
            *_flags(request.render, RenderSettings()), "--output_dir", output_dir]
    if save_merged:
        argv += ["--save_merged", save_merged, "--no_render"]
    return shlex.join(argv)


def grid_command(request: MergeRequest, content_weights: list[float], style_weights: list[float], output_dir: str) -> str:
    """The ``qrlora-grid`` line that renders the explorer's weight grid (the published grid scripts' command)."""
    argv = ["qrlora-grid", "--model_path", request.model_path,
            "--style_lora_path", str(adapter_file(request.style, "style")),
            "--content_lora_path", str(adapter_file(request.content, "content")),
            "--style_weights", ",".join(f"{w:g}" for w in style_weights),
            "--content_weights", ",".join(f"{w:g}" for w in content_weights), *_strategy_flags(request),
            *_flags(request.render, RenderSettings()), "--output_dir", output_dir]
    return shlex.join(argv)


def world_of(model_path: str) -> World | None:
    """The CPU world a base model is (a folder with ``world.json``), else None: only a world has a verdict."""
    if not (Path(model_path) / "world.json").is_file():
        return None
    return load_world(model_path, flag="base model")


def world_render_settings(world: World, **changes) -> RenderSettings:
    """How a world is sampled everywhere (its size and T5 length, 20 steps, guidance 4), with ``changes``."""
    base = dict(num_inference_steps=SAMPLE_STEPS, guidance_scale=SAMPLE_GUIDANCE, height=world.resolution,
                width=world.resolution, max_sequence_length=world.max_sequence_length)
    return RenderSettings(**{**base, **changes})


@dataclass(frozen=True)
class Verdict:
    """What the world's classifier sees in one image against what the pair was trained to add."""

    shape: str
    style: str
    wanted_shape: str
    wanted_style: str

    @property
    def content_right(self) -> bool:
        return self.shape == self.wanted_shape

    @property
    def style_right(self) -> bool:
        return self.style == self.wanted_style

    def text(self) -> str:
        def part(what, right, seen, wanted):
            return f"{what} {'right' if right else 'wrong'} ({seen}{'' if right else f', wanted {wanted}'})"
        both = "both right" if self.content_right and self.style_right else "not both"
        return (f"{part('content', self.content_right, self.shape, self.wanted_shape)} · "
                f"{part('style', self.style_right, self.style, self.wanted_style)} · {both}")


def verdicts(world: World, images: list[Image.Image]) -> list[Verdict]:
    """The classifier's verdict on each image: the held-out shape (content) and style the world's adapters learn."""
    shapes, styles = world.classify(images)
    return [Verdict(s, t, world.new_shape, world.new_style) for s, t in zip(shapes, styles)]


def preview(image: Image.Image) -> Image.Image:
    """``image`` upscaled by an integer factor (nearest) to at least ``PREVIEW`` px, so 32 px renders are visible."""
    factor = max(1, PREVIEW // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


class Explorer:
    """The explorer's one server-side session: run discovery under ``roots`` and the merged pipeline of the last
    request, kept while only the weights, prompt or seed change (loading is the slow part)."""

    def __init__(self, roots: list[str]):
        self.roots = [str(r) for r in roots]
        self._key = None
        self._merged: MergedPipeline | None = None

    def runs(self) -> list[Run]:
        """Every finished run under ``<root>/exps_*/``, newest first."""
        return sorted(find_runs(self.roots), key=lambda r: r.mtime, reverse=True)

    def adapters(self, request: MergeRequest) -> list[AdapterFile]:
        """[content, style], read and validated (NaN / inf, shapes, metadata) by the one adapter reader."""
        return [load_adapter(adapter_file(request.content, "content")), load_adapter(adapter_file(request.style, "style"))]

    def pipeline(self, request: MergeRequest) -> MergedPipeline:
        """The ``MergedPipeline`` of this request (content first, as ``python -m qrlora.merge --adapters C S``)."""
        files = [adapter_file(request.content, "content"), adapter_file(request.style, "style")]
        key = (request.model_path, tuple((str(f.resolve()), f.stat().st_mtime_ns) for f in files), request.strategy,
               request.settings, dataclasses.replace(request.render, seed=0, prompt=""))
        # ZipLoRA learns its coefficients along the prompt's sampling trajectory: a new prompt is a new merge.
        if not STRATEGIES[request.strategy].folds_weights or request.strategy == "ziplora":
            key += (request.render.prompt, request.render.seed)
        if key != self._key:
            self._merged, self._key = None, None  # a failed load leaves no half-built pipeline behind
            self._merged = MergedPipeline(request.model_path, self.adapters(request), None, request.render,
                                          strategy=request.strategy, roles=(0, 1), settings=request.settings)
            self._key = key
        return self._merged

    def render(self, request: MergeRequest) -> Image.Image:
        """One image at the request's (content, style) weights."""
        return self.pipeline(request).render([request.content_weight, request.style_weight], request.render)

    def render_grid(self, request: MergeRequest, content_weights: list[float], style_weights: list[float],
                    progress: Callable[[int, int], None] = lambda done, total: None) -> dict[tuple[float, float], Image.Image]:
        """``{(style weight, content weight): image}`` over the grid, ``progress(done, total)`` after each image."""
        merged, total, images = self.pipeline(request), len(content_weights) * len(style_weights), {}
        for c in content_weights:
            for s in style_weights:
                images[(s, c)] = merged.render([c, s], request.render)
                progress(len(images), total)
        return images

    @staticmethod
    def grid_image(images: dict[tuple[float, float], Image.Image], content_weights, style_weights) -> Image.Image:
        """The labelled grid the grid CLI writes as ``grid.png``, its cells upscaled for the page."""
        return label_grid({k: preview(v) for k, v in images.items()}, style_weights, content_weights)

    def save_merged(self, request: MergeRequest, folder: str, overwrite: bool = False) -> Path:
        """The merged denoiser at the request's weights, in the diffusers layout (``--save_merged``), written
        atomically; refused for strategies with no single merged weight and for a folder that holds files."""
        for adapter in self.adapters(request):
            adapter.require_weight_change("saving the merge folds it into the weights", "render it live instead")
        if not STRATEGIES[request.strategy].folds_weights:
            raise UserError(f"save: --merge_strategy {request.strategy} switches adapters per step; "
                            "it has no single merged weight")
        saved = Path(folder).expanduser()
        if saved.exists() and (not saved.is_dir() or any(saved.iterdir())) and not overwrite:
            raise UserError(f"save: {saved} exists and is not an empty folder; choose a new folder")
        check_writable(saved.parent, "save", merged_size_estimate(request.model_path))
        merged = self.pipeline(request)
        try:  # the CLI's --save_merged: the strategy's own merge, folded, written atomically
            merged.save_merged([request.content_weight, request.style_weight], saved)
        finally:
            self._key = None  # the denoiser now holds the folded weights: the next render rebuilds the pipeline
        return saved


def similarity_heatmap(content: AdapterFile, style: AdapterFile) -> Image.Image:
    """Per-layer similarity of the pair's weight changes ``dW`` (cosine and linear CKA, rows) over the layers they
    share (columns, by depth): the numbers ``test/visualize_qrlora_similarity.py`` plots, as one heatmap."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..evaluation.analysis.ordering import order_layers
    from ..evaluation.analysis.similarity import pair_similarity

    layers = order_layers(set(content.layers) & set(style.layers))
    if not layers:
        raise UserError(f"{content.path} and {style.path}: no layer in common (trained on different models?)")
    metrics = ("cosine", "cka")
    result = pair_similarity(content, style, layers, types=[("dW", None)], metrics=metrics, progress=False)["dW"]
    values = np.array([[np.nan if result[m][layer] is None else result[m][layer] for layer in layers] for m in metrics])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(layers)), 2.6), dpi=100)
    shown = ax.imshow(np.abs(values), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(metrics)), [f"|{m}| dW" if m == "cosine" else f"{m} dW" for m in metrics])
    ax.set_xlabel(f"{len(layers)} adapted layers, by depth")
    ax.set_title(f"content vs style: mean |cos dW| {np.nanmean(np.abs(values[0])):.3f}, "
                 f"mean CKA {np.nanmean(values[1]):.3f}", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.03)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
