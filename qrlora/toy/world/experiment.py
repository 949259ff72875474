"""What the disentanglement experiment measures on a built world (the run itself: ``qrlora.cli.world``).

For every method (``--methods``) the real trainer (``qrlora.training.trainer``) learns

* a content adapter from 4 images of the held-out shape in one seen style (``a heart in flat style``), and
* a style adapter from 4 images of one seen shape in the held-out style (``a circle in checker style``);

then for every merge strategy (``--merges``, ``qrlora.merging.strategies``) the real ``MergedPipeline`` merges the pair
at every cell of the weight grid and samples ``--samples`` images of ``a heart in checker style`` with seeds
0..N-1; the world's classifier scores them:

* content accuracy = fraction classified as the held-out shape, style accuracy = as the held-out style,
  both = both at once (the number a user of a merged pair cares about);
* leakage (direct merge, one adapter alone): the content adapter at weight 1 prompted ``a heart in {t} style``
  for the other seen styles t -> the fraction whose style is *not* t (the content adapter dragged the style along);
  the style adapter prompted ``a {s} in checker style`` for the other seen shapes s -> the fraction whose shape is
  not s;
* ``dW`` similarity of the pair: mean over layers of |cosine| of the two weight changes (``qrlora.evaluation.analysis``).

Results: ``results.json`` (everything), ``results.md`` (the table), ``results.png`` (both-correct rate per
method and strategy at the (1, 1) cell).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...files.checkpoint import load_adapter
from ...errors import UserError
from ...core.methods import METHODS
from . import data
from .world import CONTENT_STYLE, SAMPLE_GUIDANCE, SAMPLE_STEPS, STYLE_SHAPE, World, sample_images

# The methods' learning-rate multipliers (one owner: ``Method.lr_factor``; ICA's is 10), recorded in every report.
LR_FACTOR = {name: m.lr_factor for name, m in METHODS.items() if m.lr_factor != 1.0}


def dw_similarity(content_path: Path, style_path: Path) -> float | None:
    """Mean over layers of |cos(dW_content, dW_style)|; None for token-dependent (MoE) adapters.

    Layers where either ``dW`` is all zero have no direction (``metrics.cosine_similarity`` gives None) and are
    left out of the mean (``metrics.summarize``), so a layer that never trained cannot inflate it.
    """
    from ...evaluation.analysis.metrics import summarize
    from ...evaluation.analysis.similarity import DELTA_WEIGHT, pair_similarity

    c, s = load_adapter(content_path), load_adapter(style_path)
    if not (c.method.static and s.method.static):
        return None
    layers = sorted(set(c.layers) & set(s.layers))
    values = pair_similarity(c, s, layers, types=[(DELTA_WEIGHT, None)], metrics=("cosine",), progress=False)
    stats = summarize(values[DELTA_WEIGHT]["cosine"].values())
    return stats["abs_mean"] if stats["n_layers"] else None


class Sampler:
    """Samples ``samples`` images per cell through a ``MergedPipeline`` and scores them with the world."""

    def __init__(self, world: World, merged, samples: int):
        self.world, self.merged, self.samples = world, merged, samples

    def images(self, weights: tuple[float, float], prompts: list[str]) -> np.ndarray:
        """``samples`` images at these (content, style) weights; image i uses prompt i mod len and seed i."""
        extra = self.merged.strategy.apply(list(weights), SAMPLE_STEPS)
        return sample_images(self.merged.pipe, [prompts[i % len(prompts)] for i in range(self.samples)],
                             list(range(self.samples)), self.world.max_sequence_length, steps=SAMPLE_STEPS,
                             guidance=SAMPLE_GUIDANCE, **extra)

    def cell(self, weights: tuple[float, float]) -> dict:
        """Content / style / both rates of the merged prompt ``a {new shape} in {new style} style``."""
        w = self.world
        rates = w.rates(self.images(weights, [data.caption(w.new_shape, w.new_style)]), w.new_shape, w.new_style)
        return {"content_weight": weights[0], "style_weight": weights[1], "content_accuracy": rates["shape"],
                "style_accuracy": rates["style"], "both_correct": rates["both"]}

    def leakage(self, weights: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))) -> dict:
        """Each adapter alone (direct merge): how often it overrides the attribute it should leave to the prompt.

        ``weights`` = (content-alone, style-alone) cells; ((0, 0), (0, 0)) measures the base model on the same
        prompts and seeds, the reference a leak is read against.
        """
        w = self.world
        styles = [t for t in data.SEEN_STYLES if t != CONTENT_STYLE]
        shapes = [s for s in data.SEEN_SHAPES if s != STYLE_SHAPE]
        images = self.images(weights[0], [data.caption(w.new_shape, t) for t in styles])
        _, got_styles = w.classify(images)
        style_kept = np.mean([g == styles[i % len(styles)] for i, g in enumerate(got_styles)])
        content_rate = w.rates(images, shape=w.new_shape)["shape"]
        images = self.images(weights[1], [data.caption(s, w.new_style) for s in shapes])
        got_shapes, _ = w.classify(images)
        shape_kept = np.mean([g == shapes[i % len(shapes)] for i, g in enumerate(got_shapes)])
        style_rate = w.rates(images, style=w.new_style)["style"]
        return {"content_alone_shape_rate": content_rate, "content_alone_style_leak": float(1 - style_kept),
                "style_alone_style_rate": style_rate, "style_alone_shape_leak": float(1 - shape_kept)}


def _at(entry: dict, weights=(1.0, 1.0)) -> dict | None:
    """The cell at ``weights`` of one strategy's results (None if not on the grid)."""
    return next((c for c in entry.get("cells", []) if (c["content_weight"], c["style_weight"]) == tuple(weights)), None)


def markdown(results: dict) -> str:
    """The docs/world.md table: one row per method x strategy, the (1, 1) cell and the best cell of the grid."""
    pct = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"  # noqa: E731
    base = results.get("base", {})
    lines = [f"`{results['command']}` ({results['seconds'] / 60:.0f} min)  ",
             f"prompt `{results['prompt']}`, {results['settings']['samples']} samples per cell, seeds 0..N-1. Alone: "
             "one adapter at weight 1 (direct) on prompts that pair its new attribute with the other seen ones, the "
             "rate of its new attribute / how often the other attribute is not the prompted one (leak); per method, "
             "the same on every row. "
             f"Base model on the same prompts: content {pct(base.get('content_accuracy'))}, style "
             f"{pct(base.get('style_accuracy'))}; alone-prompts: heart {pct(base.get('content_alone_shape_rate'))} / style "
             f"changed {pct(base.get('content_alone_style_leak'))}, checker {pct(base.get('style_alone_style_rate'))} / "
             f"shape changed {pct(base.get('style_alone_shape_leak'))}. abs cos dW: mean over layers where both dW are non-zero (a zero dW has no direction).",
             "",
             "| method | merge | content @(1,1) | style @(1,1) | both @(1,1) | best both (w_c, w_s) | content alone: new shape / style leak | style alone: new style / shape leak | abs cos dW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, entry in results["methods"].items():
        for name, strat in entry["strategies"].items():
            if "skipped" in strat:
                lines.append(f"| {method} | {name} | n/a | | | | | | ({strat['skipped']}) |")
                continue
            one = _at(strat) or {}
            best = max(strat["cells"], key=lambda c: c["both_correct"])
            dw = entry["dw_similarity"]
            lines.append(
                f"| {method} | {name} | {pct(one.get('content_accuracy'))} | {pct(one.get('style_accuracy'))} | "
                f"{pct(one.get('both_correct'))} | {pct(best['both_correct'])} ({best['content_weight']:g}, "
                f"{best['style_weight']:g}) | {pct(entry.get('content_alone_shape_rate'))} / "
                f"{pct(entry.get('content_alone_style_leak'))} | {pct(entry.get('style_alone_style_rate'))} / "
                f"{pct(entry.get('style_alone_shape_leak'))} | {'-' if dw is None else f'{dw:.3f}'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Grouped bars: both-correct rate at (1, 1) per method, one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    merges = results["settings"]["merges"]
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.2))
    width = 0.8 / max(1, len(merges))
    for j, name in enumerate(merges):
        values = [(_at(results["methods"][m]["strategies"].get(name, {})) or {}).get("both_correct", 0.0) for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, values, width, label=name)
    ax.set_xticks(np.arange(len(methods)) + width * (len(merges) - 1) / 2, methods)
    ax.set_ylabel("both correct @ (1, 1)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(results["prompt"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_choices(flag: str, values: list[str], allowed) -> list[str]:
    """Refuse an unknown method or strategy with one line naming the flag and the known names."""
    for v in values:
        if v not in allowed:
            raise UserError(f"{flag}: unknown {v!r}; choose from {', '.join(allowed)}")
    return values


METHOD_NAMES = list(METHODS)
