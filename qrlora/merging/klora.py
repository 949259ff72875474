"""K-LoRA (Ouyang et al., 2025, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs").

Training-free: at every adapted layer and denoising step, exactly one of the two adapters acts, chosen by
comparing the sums of each adapter's K largest absolute weight-change entries, with a step-dependent scale that
favours the content adapter early (when the layout forms) and the style adapter late (when texture forms):

    S_c = sum TopK(|dW_c|),  S_s = sum TopK(|dW_s|)                            (paper eq. 4)
    S(t) = alpha * t / T + beta,  alpha = 1.5, beta = 0.5                    (eq. 5; t = steps done, T = all steps)
    gamma = mean over layers of sum|dW_c| / sum|dW_s|                        (balance of the two adapters' scales)
    content acts iff  S_c / gamma > S(t) * S_s,  else style                   (eq. 6)

Choices made where the paper and its code leave room (docs/merging.md, "Comparing merge methods"): ``t / T`` is the index
of the denoising step over the number of steps (the published code counts layer calls against a hard-coded
28000); K = 64 as in the published code; the chosen adapter acts at its merge weight (1.0 by default), so the
weight grid of the merge CLIs still scales each adapter. Layers only one adapter touches always use it.

The two adapters run live (the adapter layer's named adapters with per-layer weights), set before each step by
the pipeline's ``callback_on_step_end``: the same model, bases and dtype as every other strategy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..files.checkpoint import AdapterFile
from ..errors import UserError
from ..core.inject import attach_adapter
from ..core.layers import adapter_layers

KLORA_K = 64
KLORA_ALPHA = 1.5
KLORA_BETA = 0.5
CONTENT, STYLE = "klora_content", "klora_style"


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """Sum of the ``k`` largest absolute entries of ``delta`` (all of them when it has fewer): eq. 4."""
    flat = delta.detach().abs().flatten().float()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def time_scale(progress: float, alpha: float = KLORA_ALPHA, beta: float = KLORA_BETA) -> float:
    """``S(t) = alpha * t / T + beta`` (eq. 5), ``progress = t / T`` in [0, 1)."""
    return alpha * progress + beta


def balance_factor(content: Mapping[str, torch.Tensor], style: Mapping[str, torch.Tensor]) -> float:
    """``gamma``: the mean over shared layers of ``sum|dW_c| / sum|dW_s|`` (layers with a zero style change skipped)."""
    ratios = []
    for p in content.keys() & style.keys():
        s = float(style[p].abs().sum())
        if s > 0:
            ratios.append(float(content[p].abs().sum()) / s)
    return sum(ratios) / len(ratios) if ratios else 1.0


def selects_content(s_c: float, s_s: float, gamma: float, scale: float) -> bool:
    """Eq. 6: the content adapter acts iff ``S_c / gamma > S(t) * S_s``."""
    return s_c / gamma > scale * s_s


@dataclass
class LayerScores:
    """Top-K sums of one layer; ``None`` where that adapter does not touch the layer."""

    content: float | None
    style: float | None


class KLoRA:
    """Attach a content and a style adapter live to ``denoiser`` and switch them per layer and step (K-LoRA).

    Args:
        denoiser: ``pipe.transformer`` or ``pipe.unet``.
        content, style: static adapter files (any method with a weight-space ``dW``, mixed methods allowed).
        k, alpha, beta: eq. 4 and 5 hyper-parameters.
    """

    def __init__(self, denoiser: nn.Module, content: AdapterFile, style: AdapterFile, *, k: int = KLORA_K,
                 alpha: float = KLORA_ALPHA, beta: float = KLORA_BETA):
        for adapter in (content, style):
            adapter.require_weight_change("K-LoRA compares weight changes")
        if k < 1:
            raise UserError(f"--klora_k must be a positive integer, got {k}")
        self.k, self.alpha, self.beta = k, alpha, beta
        dw_c, dw_s = content.delta_weights(), style.delta_weights()  # {P: (out, in)} float32, one adapter at a time
        self.gamma = balance_factor(dw_c, dw_s)
        self.scores = {p: LayerScores(topk_sum(dw_c[p], k) if p in dw_c else None, topk_sum(dw_s[p], k) if p in dw_s else None)
                       for p in dict.fromkeys([*dw_c, *dw_s])}
        del dw_c, dw_s
        attach_adapter(denoiser, content.config, content.layers, adapter_name=CONTENT, weight=0.0, source=content.path)
        attach_adapter(denoiser, style.config, style.layers, adapter_name=STYLE, weight=0.0, source=style.path)
        self.layers = {p: layer for p, layer in adapter_layers(denoiser) if p in self.scores}
        self.weights = (1.0, 1.0)

    def choices(self, progress: float) -> dict[str, str]:
        """``{P: CONTENT or STYLE}``: which adapter acts on each layer at ``progress = t / T``."""
        scale = time_scale(progress, self.alpha, self.beta)
        out = {}
        for p, s in self.scores.items():
            if s.style is None or (s.content is not None and selects_content(s.content, s.style, self.gamma, scale)):
                out[p] = CONTENT
            else:
                out[p] = STYLE
        return out

    def set_step(self, step: int, num_steps: int) -> None:
        """Activate, on every layer, the adapter eq. 6 picks for denoising step ``step`` of ``num_steps``."""
        w_content, w_style = self.weights
        for p, chosen in self.choices(step / max(num_steps, 1)).items():
            layer = self.layers[p]
            for name, w in ((CONTENT, w_content), (STYLE, w_style)):
                if name in layer.adapters:
                    layer.adapter_weights[name] = w if name == chosen else 0.0

    def start(self, content_weight: float, style_weight: float, num_steps: int) -> dict:
        """Prepare step 0 at these merge weights; returns the pipeline keyword that switches before each next step."""
        self.weights = (float(content_weight), float(style_weight))
        self.set_step(0, num_steps)

        def on_step_end(pipe, step, timestep, callback_kwargs):
            self.set_step(step + 1, pipe.num_timesteps)
            return {}

        return {"callback_on_step_end": on_step_end}
