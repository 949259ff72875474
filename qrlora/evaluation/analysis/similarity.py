"""Adapter-pair similarity per layer and matrix type (:func:`pair_similarity`), the full run with JSON and figures
(:func:`run_similarity`), the ``dW`` comparison of a QR-LoRA pair against a plain-LoRA pair (:func:`run_compare`),
which the ``visualize_qrlora_similarity`` / ``analyze_sd3_ica_similarity`` scripts run (their flags:
``qrlora.cli.analysis``).

Files with NaN or inf values are refused with a ``UserError`` naming the file, layer and tensor.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ...files.checkpoint import AdapterFile, load_adapter
from ...merging.merger import check_compatible
from ...errors import UserError
from ...core.methods import get_method
from .cli import _output_dir, write_json
from .metrics import DEFAULT_BINS, METRICS, matrix_similarity, summarize
from .ordering import block_of, order_layers
from .plots import save_compare_figure, save_histogram, save_line_plot, save_overview


# =========================================================================================================
# Adapter pairs
# =========================================================================================================
DELTA_WEIGHT = "dW"


def matrix_types(method1: str, method2: str) -> list[tuple[str, str | None]]:
    """``[(display name, tensor name or None for dW)]`` comparable between two adapters' methods.

    Same method: every stored matrix (``Q, R, dR`` ...) plus ``dW`` when the method is static. Different
    methods: only ``dW`` (both must be static).
    """
    m1, m2 = get_method(method1), get_method(method2)
    types: list[tuple[str, str | None]] = []
    if m1.name == m2.name:
        # The tensors the method names, in the order the paper shows them (Q, R, dR; U, M0, dM; A, S0, dS; ...).
        types += [(symbol, name) for name, symbol in (m1.math_names or {n: n for n in m1.tensor_names}).items()]
    if m1.static and m2.static:
        types.append((DELTA_WEIGHT, None))
    return types


def _check_finite(adapter: AdapterFile, layers: Iterable[str]) -> None:
    for p in layers:
        for name, t in adapter.layers[p].items():
            if not torch.isfinite(t).all():
                raise UserError(f"{adapter.path}: layer {p} tensor {name} holds NaN or inf values")


def load_pair(path1: str | os.PathLike, path2: str | os.PathLike, *, flag1: str = "--lora1_path",
              flag2: str = "--lora2_path") -> tuple[AdapterFile, AdapterFile, list[str]]:
    """Load two adapter files and their common layers (ordered by depth), or raise a one-line ``UserError``.

    Refused: a file that is not an adapter, different ranks, no layer in common, NaN/inf values.
    """
    a1, a2 = load_adapter(path1), load_adapter(path2)
    check_compatible([a1, a2])  # a FLUX file against an SD3 one compares nothing meaningful
    if a1.config.rank != a2.config.rank:
        raise UserError(f"{flag2} {path2}: rank {a2.config.rank} differs from {flag1} rank {a1.config.rank}; "
                        "similarity is defined between adapters of the same rank")
    common = order_layers(set(a1.layers) & set(a2.layers))
    if not common:
        raise UserError(f"{flag1} {path1} and {flag2} {path2}: no layer in common "
                        f"(e.g. {order_layers(a1.layers)[0]} vs {order_layers(a2.layers)[0]}); "
                        "were they trained on the same model and target modules?")
    for adapter in (a1, a2):
        extra = len(adapter.layers) - len(common)
        if extra:
            print(f"note: {adapter.path}: {extra} layer(s) not in the other file are left out")
    _check_finite(a1, common)
    _check_finite(a2, common)
    return a1, a2, common


def _matrix(adapter: AdapterFile, layer: str, tensor_name: str | None) -> torch.Tensor:
    t = adapter.layers[layer]
    return adapter.method.delta_weight(t, adapter.config.scale) if tensor_name is None else t[tensor_name]


def _warn_nmi_bias(adapter: AdapterFile, layers: Sequence[str], types, bins: int) -> None:
    """One note when the smallest matrix has too few values for a ``bins x bins`` joint histogram."""
    sizes = [(adapter.layers[l][name].numel() if name else None, disp, l) for l in layers for disp, name in types]
    sizes = [s for s in sizes if s[0] is not None]
    if not sizes:
        return
    n, disp, layer = min(sizes)
    if n < 5 * bins * bins:
        print(f"note: {disp} of {layer} has {n} values for a {bins} x {bins} joint histogram; its NMI is biased "
              f"upwards (independent values score well above 0). --bins {max(2, int(math.sqrt(n / 5)))} or fewer "
              "gives a fairer estimate")


def pair_similarity(a1: AdapterFile, a2: AdapterFile, layers: Sequence[str], *, bins: int = DEFAULT_BINS,
                    types: Sequence[tuple[str, str | None]] | None = None, device: str | torch.device = "cpu",
                    metrics: Sequence[str] = METRICS, progress: bool = True) -> dict[str, dict[str, dict[str, float]]]:
    """``{type: {metric: {layer: value}}}`` over ``layers`` (kept in the given order).

    ``types`` defaults to :func:`matrix_types` of the two methods. Raises ``UserError`` naming the layer when
    a matrix's shape differs between the files (different base models).
    """
    types = list(types) if types is not None else matrix_types(a1.config.method, a2.config.method)
    if not types:
        raise UserError(f"{a1.path} ({a1.config.method}) and {a2.path} ({a2.config.method}): no matrix type in "
                        "common (dW needs two static methods)")
    result = {disp: {m: {} for m in metrics} for disp, _ in types}
    if "nmi" in metrics:
        _warn_nmi_bias(a1, layers, types, bins)
    for layer in tqdm(layers, desc="similarity", unit="layer", disable=not progress):
        for disp, name in types:
            x = _matrix(a1, layer, name).to(device)
            y = _matrix(a2, layer, name).to(device)
            if x.shape != y.shape:
                raise UserError(f"layer {layer}: {disp} has shape {tuple(x.shape)} in {a1.path} but "
                                f"{tuple(y.shape)} in {a2.path} (different base models?)")
            factors = None
            if name is None:
                factors = tuple(
                    tuple(f.to(device) for f in a.method.lora_factors(a.layers[layer], a.config.scale)) for a in (a1, a2)
                )
            values = matrix_similarity(x, y, bins=bins, is_delta_weight=name is None, factors=factors, metrics=metrics)
            for metric, v in values.items():
                result[disp][metric][layer] = v
    return result


def _adapter_info(adapter: AdapterFile, name: str, layers: Sequence[str]) -> dict:
    return {"name": name, "path": adapter.path, "method": adapter.config.method, "rank": adapter.config.rank,
            "alpha": adapter.config.lora_alpha, "backbone": adapter.backbone or "", "layers_in_file": len(adapter.layers),
            "layers_compared": len(layers)}


def run_similarity(lora1_path, lora2_path, output_dir, *, names=("style", "content"), fixed_scale=False,
                   bins=DEFAULT_BINS, device="cpu", dpi=150, require_method: Sequence[str] | None = None,
                   metrics: Sequence[str] = METRICS, matrices: Sequence[str] | None = None, progress=True,
                   figures=True, overwrite=False) -> dict:
    """The full per-layer analysis of one adapter pair; returns ``all_statistics_summary`` as written.

    Writes into ``output_dir``: ``{T}_{metric}_data.json`` (``{layer: value}`` in depth order) for every
    matrix type ``T`` and metric, ``{T}_{metric}_{fixed|auto}_line.png`` and ``..._hist.png``,
    ``overview_{fixed|auto}.png``, ``all_statistics_summary.json`` (``{T: {metric: {mean, std, min, max,
    abs_mean, n_layers}}}``) and ``analysis_info.json`` (inputs, layer order, block kinds, rules).
    ``metrics`` / ``matrices`` restrict the analysis (``--metrics``, ``--matrices``); ``figures=False`` writes the
    JSON only (for scripted use).
    """
    metrics = _check_metrics(metrics, bins)
    a1, a2, layers = load_pair(lora1_path, lora2_path)
    if require_method:
        for flag, a in (("--lora1_path", a1), ("--lora2_path", a2)):
            if a.config.method not in require_method:
                raise UserError(f"{flag} {a.path}: a {a.config.method} adapter; this analysis is for "
                                f"{'/'.join(require_method)} adapters (use test/visualize_qrlora_similarity.py)")
    types = matrix_types(a1.config.method, a2.config.method)
    if matrices:
        available = [disp for disp, _ in types]
        unknown = [m for m in matrices if m not in available]
        if unknown:
            raise UserError(f"--matrices: {', '.join(unknown)} not available for {a1.config.method}/{a2.config.method} "
                            f"adapters; choose from {', '.join(available)}")
        types = [t for t in types if t[0] in matrices]
    out = _output_dir(output_dir, "all_statistics_summary.json", overwrite)
    result = pair_similarity(a1, a2, layers, bins=bins, device=device, types=types, metrics=metrics, progress=progress)
    scale = "fixed" if fixed_scale else "auto"
    summary = {}
    plots = [(m, metric) for m in result for metric in metrics]
    for matrix, metric in tqdm(plots, desc="figures", unit="fig", disable=not progress):
        values = result[matrix][metric]
        write_json(out / f"{matrix}_{metric}_data.json", values)
        series = [values[l] for l in layers]
        summary.setdefault(matrix, {})[metric] = summarize(series)
        if not figures:
            continue
        save_line_plot(out / f"{matrix}_{metric}_{scale}_line.png", layers, series, matrix=matrix, metric=metric,
                       names=names, fixed_scale=fixed_scale, dpi=dpi)
        save_histogram(out / f"{matrix}_{metric}_{scale}_hist.png", series, matrix=matrix, metric=metric, names=names,
                       fixed_scale=fixed_scale, dpi=dpi)
    if figures:
        save_overview(out / f"overview_{scale}.png", layers, result, names=names, fixed_scale=fixed_scale, dpi=dpi)
    write_json(out / "all_statistics_summary.json", summary)
    write_json(out / "analysis_info.json", {
        "lora1": _adapter_info(a1, names[0], layers), "lora2": _adapter_info(a2, names[1], layers),
        "matrix_types": list(result), "metrics": list(metrics), "bins": bins, "layers": list(layers),
        "block_kinds": [block_of(l).kind for l in layers],
        "rules": "cosine: both zero -> 1, one zero -> 0; CKA on transposed r x in factors and dW (samples = input "
                 "dimension), tall factors as stored; CKA: both centre to zero -> 1, one -> 0; NMI = I/sqrt(H(X)H(Y)) "
                 "from a bins x bins joint histogram, constant input -> 0",
    })
    out.publish()
    _print_summary(summary, names, metrics)
    print(f"wrote {len(plots) * 2 + 1 if figures else 0} figures and {len(plots) + 2} JSON files to {out}")
    return summary


def _check_metrics(metrics: Sequence[str], bins: int) -> list[str]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"--metrics: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METRICS)}")
    if bins < 2:
        raise UserError(f"--bins: must be at least 2, got {bins}")
    return [m for m in METRICS if m in metrics]


def _print_summary(summary: Mapping[str, Mapping[str, Mapping[str, float]]], names, metrics=METRICS) -> None:
    print(f"\nsimilarity {names[0]} vs {names[1]} (mean +- std over layers)")
    print(f"{'matrix':<8}" + "".join(f"{m:>20}" for m in metrics))
    for matrix, per_metric in summary.items():
        cells = "".join(f"{per_metric[m]['mean']:>12.4f} +- {per_metric[m]['std']:<5.3f}" for m in metrics)
        print(f"{matrix:<8}{cells}")
        _print_left_out(matrix, per_metric)


def _print_left_out(what: str, per_metric: Mapping[str, Mapping[str, float]]) -> None:
    """One line per metric that left layers out of its statistics (a zero matrix has no cosine)."""
    for metric, stats in per_metric.items():
        if stats.get("n_left_out"):
            print(f"  {what} {metric}: {stats['n_left_out']} layer(s) with an all-zero matrix left out "
                  f"(no direction); statistics over the other {stats['n_layers']}")


def run_compare(qr_paths: Sequence[str], baseline_paths: Sequence[str], output_dir, *, names=("style", "content"),
                fixed_scale=False, bins=DEFAULT_BINS, device="cpu", dpi=150, metrics: Sequence[str] = METRICS,
                progress=True, overwrite=False) -> dict:
    """The paper's central figure: per-layer similarity of ``dW`` for a QR-LoRA pair next to a LoRA pair.

    Writes ``dW_comparison.png`` (rows: metrics; columns: the two pairs; shared y axis per metric) and
    ``dW_comparison.json``: ``{"pairs": [{label, method, rank, paths, per_layer: {metric: {layer: v}},
    summary: {metric: stats}}], "summary_table": {metric: {pair label: stats}}, "ratio_abs_mean":
    {metric: QR pair abs_mean / LoRA pair abs_mean}}``. Prints the summary table.
    """
    metrics = _check_metrics(metrics, bins)
    pairs = []
    for (p1, p2), (f1, f2) in ((qr_paths, ("--lora1_path", "--lora2_path")),
                               (baseline_paths, ("--baseline1_path", "--baseline2_path"))):
        a1, a2, layers = load_pair(p1, p2, flag1=f1, flag2=f2)
        for flag, a in ((f1, a1), (f2, a2)):
            a.require_weight_change("the comparison compares weight changes", "compare static adapters", flag=flag)
        per_layer = pair_similarity(a1, a2, layers, bins=bins, device=device, progress=progress, metrics=metrics,
                                    types=[(DELTA_WEIGHT, None)])[DELTA_WEIGHT]
        method = a1.config.method if a1.config.method == a2.config.method else f"{a1.config.method}/{a2.config.method}"
        label = a1.method.display_name if a1.config.method == a2.config.method else method
        pairs.append({"label": label, "method": method, "rank": a1.config.rank, "paths": [a1.path, a2.path],
                      "names": list(names), "layers": list(layers), "per_layer": per_layer,
                      "summary": {m: summarize(per_layer[m][l] for l in layers) for m in metrics}})
    if pairs[0]["label"] == pairs[1]["label"]:
        pairs[0]["label"] += " [pair 1]"
        pairs[1]["label"] += " [pair 2]"
    out = _output_dir(output_dir, "dW_comparison.json", overwrite)
    table = {m: {p["label"]: p["summary"][m] for p in pairs} for m in metrics}
    ratio = {}
    for m in metrics:
        base = pairs[1]["summary"][m]["abs_mean"]
        ratio[m] = pairs[0]["summary"][m]["abs_mean"] / base if base > 0 else None
    save_compare_figure(out / f"dW_comparison_{'fixed' if fixed_scale else 'auto'}.png", pairs, names=names,
                        fixed_scale=fixed_scale, dpi=dpi, metrics=metrics)
    payload = {"pairs": pairs, "summary_table": table, "ratio_abs_mean": ratio, "bins": bins, "metrics": metrics}
    write_json(out / "dW_comparison.json", payload)
    out.publish()
    print(f"\ndW similarity, {names[0]} vs {names[1]} (mean +- std over layers; |mean| = mean of absolute values)")
    print(f"{'metric':<8}" + "".join(f"{p['label']:>34}" for p in pairs) + f"{'ratio of |mean|':>18}")
    for m in metrics:
        cells = "".join(f"{p['summary'][m]['mean']:.4f} +- {p['summary'][m]['std']:.4f} (|{p['summary'][m]['abs_mean']:.4f}|)".rjust(34)
                        for p in pairs)
        r = "n/a" if ratio[m] is None else f"{ratio[m]:.3f}"
        print(f"{m:<8}{cells}{r:>18}")
    for p in pairs:
        _print_left_out(p["label"], p["summary"])
    print(f"wrote {out.final / 'dW_comparison.json'} and the figure")
    return payload
