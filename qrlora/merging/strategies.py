"""Merge strategies (``--merge_strategy``): how a content and a style adapter become one denoiser at given weights.

- ``direct`` (default): weighted addition ``W + sum_i w_i dW_i`` (``merge.Merger``), any number of adapters;
- ``ziplora``: learned per-column coefficients (``qrlora.merging.ziplora``), then the weighted addition of
  ``dW_c diag(m_c)`` and ``dW_s diag(m_s)``;
- ``klora``: per layer and step, the content or the style adapter acts (``qrlora.merging.klora``), live;
- ``ties`` / ``dare``: PEFT's ``merge_utils.ties`` (trim to ``--merge_density``, elect signs, disjoint mean) and
  ``merge_utils.dare_linear`` (random drop to ``--merge_density``, rescale, weighted sum) on each layer's dense
  ``dW_i``, used as PEFT ships them; DARE's drop masks are seeded per layer, so a grid is reproducible.

A strategy is built once per pipeline and asked, before each image, to set the weights; it returns the extra
pipeline keywords it needs (K-LoRA's step callback).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..files.checkpoint import AdapterFile
from ..core.decompose import layer_seed
from ..errors import UserError
from .klora import KLoRA
from .merger import Merger
from .ziplora import column_scaled_adapter, learn_with_settings, zipped_adapter


class DirectMerge:
    """The weighted addition of ``merge.Merger``, exactly as ``Merger`` computes it."""

    pair_only = False
    static_only = False  # True: every adapter must have a weight change (no live MoE path left untouched)
    folds_weights = True
    residual_form = True

    def __init__(self, pipe, denoiser, adapters: Sequence[AdapterFile], residual, roles, settings, render):
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
    static_only = True
    residual_form = False

    def __init__(self, pipe, denoiser, adapters, residual, roles, settings, render):
        content_index, style_index = roles
        content, style = adapters[content_index], adapters[style_index]
        self.result, self.provenance = learn_with_settings(pipe, denoiser, content, style, settings, render)
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
    static_only = True
    folds_weights = False
    residual_form = False
    merger = None

    def __init__(self, pipe, denoiser, adapters, residual, roles, settings, render):
        self.roles = roles
        self.klora = KLoRA(denoiser, adapters[roles[0]], adapters[roles[1]], k=settings.klora_k,
                           alpha=settings.klora_alpha, beta=settings.klora_beta)

    def apply(self, weights: Sequence[float], num_steps: int) -> dict:
        return self.klora.start(weights[self.roles[0]], weights[self.roles[1]], num_steps)

    def learned_adapter(self) -> None:
        return None


class PeftMerge(DirectMerge):
    """A PEFT ``merge_utils`` rule applied per layer to the adapters' dense ``dW_i`` with the grid's weights."""

    residual_form = False
    static_only = True  # TIES / DARE act on dense dW; a live MoE path would be added untouched (issue 30)

    def __init__(self, pipe, denoiser, adapters, residual, roles, settings, render):
        super().__init__(pipe, denoiser, adapters, None, roles, settings, render)
        self.density = float(settings.merge_density)
        self.majority_sign = settings.ties_majority_sign

    def combine(self, layer: str, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, weights: Sequence[float], num_steps: int) -> dict:
        self.merger.merge_combined(weights, self.combine)
        return {}


class TiesMerge(PeftMerge):
    """TIES-merging (Yadav et al., 2023) through ``peft.utils.merge_utils.ties``."""

    def combine(self, layer, deltas, weights):
        from peft.utils.merge_utils import ties

        return ties(deltas, torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device), self.density,
                    majority_sign_method=self.majority_sign)


class DareMerge(PeftMerge):
    """DARE (Yu et al., 2024) through ``peft.utils.merge_utils.dare_linear``; drop masks seeded per layer."""

    def combine(self, layer, deltas, weights):
        from peft.utils.merge_utils import dare_linear

        with torch.random.fork_rng(devices=[]):  # PEFT draws the masks from the global generator
            torch.manual_seed(layer_seed(0, layer))
            return dare_linear(deltas, torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device),
                               self.density)


STRATEGIES = {"direct": DirectMerge, "ziplora": ZipLoRAMerge, "klora": KLoRAMerge, "ties": TiesMerge, "dare": DareMerge}


def check_strategy(name: str, adapters: Sequence[AdapterFile], residual_path: str | None) -> None:
    """Refuse, before any model loads, what a strategy cannot do (one line naming the flag)."""
    strategy = STRATEGIES[name]
    if strategy.pair_only and len(adapters) != 2:
        raise UserError(f"--merge_strategy {name} merges exactly one content and one style adapter, got {len(adapters)}")
    if residual_path and not strategy.residual_form:
        raise UserError(f"--residual_path: the residual form is a direct merge; --merge_strategy {name} uses the delta form")
    if strategy.static_only:
        for adapter in adapters:
            adapter.require_weight_change(f"--merge_strategy {name} compares or scales weight changes",
                                          "use --merge_strategy direct")
