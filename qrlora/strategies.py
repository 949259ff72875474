"""Merge strategies (``--merge_strategy``): how a content and a style adapter become one denoiser at given weights.

- ``direct`` (default): weighted addition ``W + sum_i w_i dW_i`` (``merge.Merger``), any number of adapters;
- ``ziplora``: learned per-column coefficients (``qrlora.ziplora``), then the weighted addition of
  ``dW_c diag(m_c)`` and ``dW_s diag(m_s)``;
- ``klora``: per layer and step, the content or the style adapter acts (``qrlora.klora``), live.

A strategy is built once per pipeline and asked, before each image, to set the weights; it returns the extra
pipeline keywords it needs (K-LoRA's step callback).
"""
from __future__ import annotations

from typing import Sequence

from .checkpoint import AdapterFile
from .errors import UserError
from .klora import KLoRA
from .merge import Merger
from .ziplora import column_scaled_adapter, learn_from_args, zipped_adapter


class DirectMerge:
    """The weighted addition of ``merge.Merger``, exactly as ``Merger`` computes it."""

    pair_only = False
    folds_weights = True
    residual_form = True

    def __init__(self, pipe, denoiser, adapters: Sequence[AdapterFile], residual, roles, args, call_kwargs):
        self.merger = Merger(denoiser, adapters, residual=residual)

    def apply(self, weights: Sequence[float], num_steps: int) -> dict:
        self.merger.merge(weights)
        return {}

    def learned_adapter(self) -> AdapterFile | None:
        """An adapter file of what the strategy learned (ZipLoRA), else None."""
        return None


class ZipLoRAMerge(DirectMerge):
    """Learn ZipLoRA's coefficients once, then merge the column-scaled adapters by weighted addition."""

    pair_only = True
    residual_form = False

    def __init__(self, pipe, denoiser, adapters, residual, roles, args, call_kwargs):
        content_index, style_index = roles
        content, style = adapters[content_index], adapters[style_index]
        self.result, self.provenance = learn_from_args(pipe, denoiser, content, style, args, call_kwargs)
        self.pair = (content, style)
        scaled = list(adapters)
        scaled[content_index] = column_scaled_adapter(content, self.result.content)
        scaled[style_index] = column_scaled_adapter(style, self.result.style)
        self.merger = Merger(denoiser, scaled, residual=None)

    def learned_adapter(self) -> AdapterFile:
        return zipped_adapter(*self.pair, self.result, self.provenance)


class KLoRAMerge:
    """K-LoRA's per-layer, per-step choice between the two adapters, live."""

    pair_only = True
    folds_weights = False
    residual_form = False
    merger = None

    def __init__(self, pipe, denoiser, adapters, residual, roles, args, call_kwargs):
        self.roles = roles
        self.klora = KLoRA(denoiser, adapters[roles[0]], adapters[roles[1]], k=args.klora_k,
                           alpha=args.klora_alpha, beta=args.klora_beta)

    def apply(self, weights: Sequence[float], num_steps: int) -> dict:
        return self.klora.start(weights[self.roles[0]], weights[self.roles[1]], num_steps)

    def learned_adapter(self) -> None:
        return None


STRATEGIES = {"direct": DirectMerge, "ziplora": ZipLoRAMerge, "klora": KLoRAMerge}


def check_strategy(name: str, adapters: Sequence[AdapterFile], residual_path: str | None) -> None:
    """Refuse, before any model loads, what a strategy cannot do (one line naming the flag)."""
    strategy = STRATEGIES[name]
    if strategy.pair_only and len(adapters) != 2:
        raise UserError(f"--merge_strategy {name} merges exactly one content and one style adapter, got {len(adapters)}")
    if residual_path and not strategy.residual_form:
        raise UserError(f"--residual_path: the residual form is a direct merge; --merge_strategy {name} uses the delta form")
    if strategy.pair_only:
        live = [a.path for a in adapters if not a.method.static]
        if live:
            raise UserError(f"--merge_strategy {name}: {live[0]} is token-dependent (MoE) and has no weight change to "
                            "compare or scale; use --merge_strategy direct")
