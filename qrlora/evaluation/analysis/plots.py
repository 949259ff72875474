"""Figures of the analyses, drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot): per-layer
similarity curves, histograms, the overview and the ``--compare`` figure; expert-usage heatmaps and step curves;
and the helpers they share (figure, layer axes shaded and labelled by block)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .metrics import METRICS
from .ordering import block_of

METRIC_TITLES = {"cosine": "Cosine similarity", "cka": "Linear CKA", "nmi": "Normalised mutual information"}


def _figure(figsize):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switch, safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


_KIND_COLORS = {"joint": "#d6e6f5", "single": "#fde2c4", "down": "#d6e6f5", "mid": "#dcf0d5", "up": "#fde2c4",
                "other": "#ececec"}
_KIND_NAMES = {"joint": "joint blocks", "single": "single blocks", "down": "down blocks", "mid": "mid block",
               "up": "up blocks", "other": "other layers"}
_METRIC_LIMITS = {"cosine": (-1.05, 1.05), "cka": (-0.05, 1.05), "nmi": (-0.05, 1.05)}


def _decorate_layers(ax, layers: Sequence[str], *, max_ticks: int = 40) -> list:
    """Shade block kinds behind the curve and label the x axis with block names (``J3``, ``S5``, ``D1.0.0``)."""
    from matplotlib.patches import Patch

    infos = [block_of(p) for p in layers]
    start, handles, seen = 0, [], set()
    for i in range(1, len(infos) + 1):
        if i == len(infos) or infos[i].kind != infos[start].kind:
            kind = infos[start].kind
            ax.axvspan(start - 0.5, i - 0.5, color=_KIND_COLORS.get(kind, "#ececec"), zorder=0, lw=0)
            if kind not in seen:
                seen.add(kind)
                handles.append(Patch(color=_KIND_COLORS.get(kind, "#ececec"), label=_KIND_NAMES.get(kind, kind)))
            start = i
    if len(layers) <= max_ticks:
        ticks, labels = list(range(len(layers))), [info.short for info in infos]
    else:  # one tick per block start, thinned to at most max_ticks
        starts = [i for i in range(len(infos)) if i == 0 or infos[i].label != infos[i - 1].label]
        step = max(1, math.ceil(len(starts) / max_ticks))
        ticks = starts[::step]
        labels = [infos[i].label or infos[i].leaf for i in ticks]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=7 if len(ticks) > 20 else 8)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer, ordered by block depth (J = joint, S = single, D/M/U = down/mid/up)")
    return handles


def _defined(values) -> np.ndarray:
    """Float array of per-layer values with None (undefined: no direction) as NaN."""
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _plot_series(ax, layers, values, *, label, color="C0", metric=None, fixed_scale=False):
    xs = np.arange(len(layers))
    values = _defined(values)  # None (a cosine with a zero matrix) -> NaN: a gap in the line, not in the mean
    ax.plot(xs, values, marker="o", ms=3, lw=1.2, color=color, label=label, zorder=3)
    live = values[~np.isnan(values)]
    mean = float(live.mean()) if live.size else 0.0
    left_out = f", {values.size - live.size} without direction left out" if live.size < values.size else ""
    ax.axhline(mean, color=color, ls="--", lw=1, alpha=0.8, label=f"mean = {mean:.3f}{left_out}", zorder=2)
    if metric == "cosine":
        ax.axhline(0.0, color="grey", lw=0.8, zorder=1)
    if fixed_scale and metric in _METRIC_LIMITS:
        ax.set_ylim(*_METRIC_LIMITS[metric])
    ax.grid(True, axis="y", ls=":", alpha=0.7)


def save_line_plot(path, layers, values, *, matrix, metric, names, fixed_scale, dpi=150) -> Path:
    """Per-layer curve of one metric for one matrix type, block kinds shaded."""
    fig = _figure((max(8.0, min(24.0, 0.12 * len(layers) + 6)), 5.0))
    ax = fig.add_subplot()
    _plot_series(ax, layers, values, label=f"{matrix}: {names[0]} vs {names[1]}", metric=metric,
                 fixed_scale=fixed_scale)
    handles = _decorate_layers(ax, layers)
    ax.set_ylabel(METRIC_TITLES[metric])
    ax.set_title(f"{METRIC_TITLES[metric]} of {matrix} per layer ({names[0]} vs {names[1]})")
    line_handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=line_handles + handles, loc="best", fontsize=8)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_histogram(path, values, *, matrix, metric, names, fixed_scale, dpi=150) -> Path:
    """Distribution of one metric over layers for one matrix type."""
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    given = _defined(values)
    values = given[~np.isnan(given)]  # layers without a direction are left out (and counted in the label)
    left_out = f" ({given.size - values.size} without direction left out)" if values.size < given.size else ""
    rng = _METRIC_LIMITS[metric] if fixed_scale else None
    if rng is None and values.size and values.max() - values.min() < 1e-3:
        mid = float(values.mean())
        rng = (mid - 0.05, mid + 0.05)  # all layers (nearly) equal: one visible bar, not a degenerate range
    ax.hist(values, bins=max(5, min(30, values.size // 2 or 1)), range=rng, color="C0", edgecolor="white",
            label=f"{values.size} layers{left_out}")
    mean = float(values.mean()) if values.size else 0.0
    ax.axvline(mean, color="C3", ls="--", label=f"mean = {mean:.3f}")
    if rng is not None:
        ax.set_xlim(*rng)
    ax.set_xlabel(METRIC_TITLES[metric])
    ax.set_ylabel("number of layers")
    ax.set_title(f"Distribution over layers of the {METRIC_TITLES[metric]} of {matrix}\n({names[0]} vs {names[1]})")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_overview(path, layers, result, *, names, fixed_scale, dpi=150) -> Path:
    """One panel per metric, one curve per matrix type: where similarity sits, at a glance."""
    metrics = list(next(iter(result.values())))
    fig = _figure((max(9.0, min(24.0, 0.12 * len(layers) + 7)), 3.2 * len(metrics) + 1))
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics):
        for i, matrix in enumerate(result):
            # Distinct markers and dashes: curves that coincide (Q and R at 1; dR and dW, whose cosine and CKA
            # are equal because Q is orthonormal) stay visible on top of each other.
            ax.plot(np.arange(len(layers)), [result[matrix][metric][l] for l in layers], marker="os^Dv<>p"[i % 8],
                    ms=max(2.0, 6.0 - 1.2 * i), lw=1.2, ls=("-", "--", "-.", ":")[i % 4], mfc="none" if i % 2 else None,
                    color=f"C{i}", label=matrix, zorder=3 + i)
        handles = _decorate_layers(ax, layers)
        if fixed_scale:
            ax.set_ylim(*_METRIC_LIMITS[metric])
        ax.set_ylabel(METRIC_TITLES[metric].replace("Normalised mutual information", "NMI"))
        ax.grid(True, axis="y", ls=":", alpha=0.7)
        line_handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=line_handles + handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    for ax in axes[:-1]:
        ax.set_xlabel("")
    fig.suptitle(f"Per-layer similarity of every matrix type: {names[0]} vs {names[1]}")
    fig.savefig(path, dpi=dpi)
    return Path(path)


# =========================================================================================================
# Similarity --compare figure (run_compare)
# =========================================================================================================


def save_compare_figure(path, pairs, *, names, fixed_scale, dpi=150, metrics: Sequence[str] = METRICS) -> Path:
    """Rows: cosine, CKA, NMI of ``dW``; columns: the QR-LoRA pair and the LoRA pair; shared y per row."""
    widest = max(len(p["layers"]) for p in pairs)
    fig = _figure((2 * max(6.0, min(14.0, 0.1 * widest + 5)), 3.2 * len(metrics) + 1.2))
    axes = fig.subplots(len(metrics), len(pairs), sharey="row", squeeze=False)
    for row, metric in enumerate(metrics):
        for col, pair in enumerate(pairs):
            ax = axes[row][col]
            layers = pair["layers"]
            _plot_series(ax, layers, [pair["per_layer"][metric][l] for l in layers], label=pair["label"],
                         color=f"C{col}", metric=metric, fixed_scale=fixed_scale)
            handles = _decorate_layers(ax, layers, max_ticks=30)
            if row < len(metrics) - 1:  # every row of a column has the same layers: name them once, at the bottom
                ax.set_xlabel("")
                ax.tick_params(labelbottom=False)
            if row == 0:
                ax.set_title(f"{pair['label']}, rank {pair['rank']}")
            if col == 0:
                ax.set_ylabel(f"{METRIC_TITLES[metric]}\nof dW".replace("Normalised mutual information", "NMI"))
            line_handles, _ = ax.get_legend_handles_labels()
            ax.legend(handles=line_handles + handles, loc="best", fontsize=7)
    fig.suptitle(f"Similarity of the weight changes dW per layer: {names[0]} vs {names[1]}\n"
                 "lower = more disentangled", fontsize=12)
    fig.savefig(path, dpi=dpi)
    return Path(path)


# =========================================================================================================
# Expert usage figures
# =========================================================================================================


def _expert_labels(num_experts: int) -> list[str]:
    # Expert e owns the e-th slice of the singular spectrum: 0 = largest singular values (low frequency).
    return [f"E{e}" + (" (top)" if e == 0 and num_experts > 1 else " (tail)" if e == num_experts - 1 and num_experts > 1 else "")
            for e in range(num_experts)]


def _layer_axis(ax, layers: Sequence[str], max_ticks: int = 60) -> None:
    infos = [block_of(l) for l in layers]
    step = max(1, math.ceil(len(layers) / max_ticks))
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([infos[i].short for i in ticks], fontsize=7 if len(ticks) > 30 else 8)
    ax.set_ylabel("layer, ordered by block depth")


def save_usage_heatmap(path, layers, data: np.ndarray, *, title: str, dpi=150, diverging=False,
                       colorbar_label="mean gate weight") -> Path:
    """Heatmap layers (rows, depth order) x experts (columns)."""
    fig = _figure((max(5.0, 1.0 * data.shape[1] + 4), max(4.0, min(40.0, 0.2 * len(layers) + 2))))
    ax = fig.add_subplot()
    if diverging:
        lim = float(np.abs(data).max()) or 1.0
        im = ax.imshow(data, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    else:
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(data.max()), 1e-12),
                       interpolation="nearest")
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set_xticks(range(data.shape[1]))
    ax.set_xticklabels(_expert_labels(data.shape[1]), rotation=45 if data.shape[1] > 4 else 0)
    ax.set_xlabel("expert (singular-spectrum slice: top -> tail)")
    _layer_axis(ax, layers)
    ax.set_title(title)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def save_step_curve(path, per_step: np.ndarray, *, title: str, dpi=150) -> Path:
    """Mean gate weight per expert (one line each) against the denoising step."""
    fig = _figure((8.0, 4.5))
    ax = fig.add_subplot()
    steps = np.arange(per_step.shape[0])
    for e, label in enumerate(_expert_labels(per_step.shape[1])):
        ax.plot(steps, per_step[:, e], marker="o", ms=3, label=label, color=f"C{e % 10}",
                ls="-" if e < 10 else "--")
    ax.axhline(1.0 / per_step.shape[1], color="grey", ls=":", label="uniform")
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("mean gate weight")
    ax.set_title(title, fontsize=10)
    ax.grid(True, ls=":", alpha=0.7)
    ax.legend(fontsize=8, ncol=2 if per_step.shape[1] > 6 else 1)
    fig.savefig(path, dpi=dpi)
    return Path(path)
