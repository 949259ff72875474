"""Measure what the paper argues: adapters trained from the same frozen basis are far less alike than LoRAs.

QR-LoRA's claim (Yang et al., 2025) is quantitative: a content and a style adapter trained from the same frozen
``Q`` and ``R`` share ``Q`` and the base ``R`` exactly, while their ``dR`` (and so their weight changes ``dW``)
are far less alike than two plain LoRAs trained on the same two tasks. This package holds everything the
``test/`` analysis scripts do; their flags live in ``qrlora.cli.analysis``. Its modules, by job:

* :mod:`.metrics` (pure functions, float64 internally): :func:`cosine_similarity`, :func:`linear_cka`
  (+ :func:`linear_cka_factored` for low-rank ``dW``), :func:`normalized_mutual_information`; its docstring
  states the rules for degenerate inputs (so no JSON ever holds NaN);
* :mod:`.ordering`: layer order by block depth (:func:`layer_sort_key`, :func:`block_of`): SD3/FLUX joint
  blocks, then FLUX single blocks; SDXL down < mid < up;
* :mod:`.similarity`: adapter-pair similarity per layer and matrix type (:func:`pair_similarity`), the full run
  (:func:`run_similarity`) and the ``dW`` comparison of a QR-LoRA pair against a plain-LoRA pair
  (:func:`run_compare`);
* :mod:`.experts`: MoE expert usage during sampling (:func:`expert_usage`, :func:`run_expert_usage`) and the
  style vs content usage difference (:func:`run_compare_usage`);
* :mod:`.plots`: the figures (matplotlib, Agg canvas); :mod:`.cli`: strict JSON output, ``--output_dir`` and
  ``--device`` handling shared by the runs.

Files with NaN or inf values are refused with a ``UserError`` naming the file, layer and tensor.
"""
from .cli import write_json
from .experts import (
    ExpertUsage,
    adapter_label,
    compare_usage,
    expert_usage,
    run_compare_usage,
    run_expert_usage,
)
from .metrics import (
    DEFAULT_BINS,
    METRICS,
    cka_view,
    cosine_similarity,
    linear_cka,
    linear_cka_factored,
    matrix_similarity,
    normalized_mutual_information,
    summarize,
)
from .ordering import BlockInfo, block_of, layer_sort_key, order_layers
from .plots import (
    METRIC_TITLES,
    save_compare_figure,
    save_histogram,
    save_line_plot,
    save_overview,
    save_step_curve,
    save_usage_heatmap,
)
from .similarity import (
    DELTA_WEIGHT,
    load_pair,
    matrix_types,
    pair_similarity,
    run_compare,
    run_similarity,
)

# The package's public API (its flag helpers live in ``qrlora.cli.analysis``). Every other name imported above is
# importable from here too.
__all__ = [
    "METRICS",
    "cosine_similarity",
    "linear_cka",
    "linear_cka_factored",
    "normalized_mutual_information",
    "matrix_similarity",
    "layer_sort_key",
    "order_layers",
    "block_of",
    "matrix_types",
    "load_pair",
    "pair_similarity",
    "summarize",
    "run_similarity",
    "run_compare",
    "expert_usage",
    "run_expert_usage",
    "compare_usage",
    "run_compare_usage",
]
