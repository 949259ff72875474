"""ZipLoRA (Shah et al., 2023, "ZipLoRA: Any Subject in Any Style by Effectively Merging LoRAs").

Each adapted layer's merged change scales every column of each adapter's change by a learned coefficient:

    dW_m = dW_c diag(m_c) + dW_s diag(m_s)        (paper eq. 3: column-wise products m ⊗ dW; dW is out x in,
                                                   so m_c, m_s have one entry per input feature, length in)

and the coefficients (initialised to 1) minimise, over the denoiser's outputs (paper eq. 4),

    L = || D_m(x_c, p_c) - D_c(x_c, p_c) ||^2 + || D_m(x_s, p_s) - D_s(x_s, p_s) ||^2 + lambda * sum_layers |cos(m_c, m_s)|

where ``D_c`` is the denoiser with the content adapter alone, ``D_s`` with the style adapter alone, ``D_m`` with the
merged change, ``p_c``, ``p_s`` each adapter's own prompt, and ``x_c``, ``x_s`` the noisy latents the denoiser sees
while sampling each adapter on its own prompt (recorded once; the squared norms are taken as means over elements).
Because ``dW diag(m) x = dW (m * x)``, the merged forward scales each adapter's input by its coefficients: no
dense ``dW`` is ever built, and any static method (QR-LoRA files and plain LoRA files alike) takes part.

The result is a normal adapter file in the plain ``lora`` layout: per layer ``lora_B = [B_c, B_s]`` (out x (k_c+k_s))
and ``lora_A = [A_c diag(m_c); A_s diag(m_s)]`` with ``B A = dW`` of each input file, zero-padded to one rank, alpha
= rank (scale 1), provenance in the metadata. Every other tool (merge, export, analysis) reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..files.checkpoint import AdapterFile, adapter_metadata
from ..errors import UserError
from ..core.inject import attach_adapter, set_adapter_weights
from ..core.layers import adapter_layers, unwrap_adapters_
from ..core.methods import AdapterConfig

ZIPLORA_STEPS = 100  # the paper's number of gradient updates
ZIPLORA_LAMBDA = 0.01  # the paper's weight of the cosine penalty
ZIPLORA_LR = 0.01  # not stated in the paper; ours (docs/merging.md)
CONTENT, STYLE = "zip_content", "zip_style"


class ColumnScaled(nn.Module):
    """An adapter path whose change has its columns scaled: ``dW diag(m) x = dW (m * x)``; ``m`` (in,) trains."""

    def __init__(self, state: nn.Module, in_features: int):
        super().__init__()
        self.state = state
        device = next(iter(state.tensors().values())).device
        self.merger = nn.Parameter(torch.ones(in_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state(x * self.merger.to(x.dtype))


# ---------------------------------------------------------------------------------------------------------
# Recording what the denoiser sees while each adapter samples its own prompt
# ---------------------------------------------------------------------------------------------------------
def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _prediction(output: Any) -> torch.Tensor:
    """The denoiser's prediction from whatever it returns (a tuple with ``return_dict=False``, or an output object)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


@dataclass
class DenoiserCall:
    """One recorded denoiser call: its inputs and the single adapter's output on them (the target)."""

    args: tuple
    kwargs: dict
    target: torch.Tensor

    def run(self, denoiser: nn.Module) -> torch.Tensor:
        return _prediction(denoiser(*self.args, **self.kwargs))


def record_calls(pipe, denoiser: nn.Module, prompt: str, call_kwargs: dict) -> list[DenoiserCall]:
    """Sample ``prompt`` with the adapters as currently weighted; every denoiser call's inputs and output."""
    calls: list[DenoiserCall] = []

    def hook(module, args, kwargs, output):
        calls.append(DenoiserCall(_detached(args), _detached(kwargs), _prediction(output).detach().clone()))

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=prompt, **call_kwargs)
    finally:
        handle.remove()
    return calls


# ---------------------------------------------------------------------------------------------------------
# Learning the merger coefficients
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ZipResult:
    """Learned coefficients ``{P: m}`` (float32, CPU) per adapter and the objective before and after."""

    content: dict[str, torch.Tensor]
    style: dict[str, torch.Tensor]
    objective_start: float
    objective_end: float
    history: list[float] = field(default_factory=list)


def _mergers(denoiser: nn.Module, name: str) -> dict[str, nn.Parameter]:
    return {p: layer.adapters[name].merger for p, layer in adapter_layers(denoiser) if name in layer.adapters}


def _cosine_penalty(m_c: dict[str, torch.Tensor], m_s: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum over layers of |cos(m_c, m_s)|`` on the layers both adapters touch."""
    terms = [torch.nn.functional.cosine_similarity(m_c[p], m_s[p], dim=0).abs() for p in m_c.keys() & m_s.keys()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def learn_mergers(pipe, denoiser: nn.Module, content: AdapterFile, style: AdapterFile, *, content_prompt: str,
                  style_prompt: str, call_kwargs: dict, steps: int = ZIPLORA_STEPS, lr: float = ZIPLORA_LR,
                  lam: float = ZIPLORA_LAMBDA, seed: int = 0, progress: bool = True) -> ZipResult:
    """Optimise ZipLoRA's merger coefficients (module docstring) on ``pipe``'s denoiser; leaves the denoiser clean.

    ``call_kwargs`` are the pipeline keywords used to sample each adapter on its own prompt (steps, size, seed).
    """
    for adapter in (content, style):
        adapter.require_weight_change("ZipLoRA scales the columns of a weight change")
    if steps < 0:
        raise UserError(f"--ziplora_steps must be >= 0, got {steps}")
    denoiser.requires_grad_(False)
    attach_adapter(denoiser, content.config, content.layers, adapter_name=CONTENT, weight=1.0, source=content.path)
    attach_adapter(denoiser, style.config, style.layers, adapter_name=STYLE, weight=0.0, source=style.path)
    try:
        # 1. What each adapter alone does on its own prompt: inputs x and targets D_c(x, p_c), D_s(x, p_s).
        content_calls = record_calls(pipe, denoiser, content_prompt, call_kwargs)
        set_adapter_weights(denoiser, {CONTENT: 0.0, STYLE: 1.0})
        style_calls = record_calls(pipe, denoiser, style_prompt, call_kwargs)
        # 2. Both adapters on, each through its column scales m (initialised to 1: the direct merge).
        for _, layer in adapter_layers(denoiser):
            for name in (CONTENT, STYLE):
                if name in layer.adapters:
                    layer.adapters[name] = ColumnScaled(layer.adapters[name], layer.in_features)
        set_adapter_weights(denoiser, {CONTENT: 1.0, STYLE: 1.0})
        m_c, m_s = _mergers(denoiser, CONTENT), _mergers(denoiser, STYLE)

        def objective(c: DenoiserCall, s: DenoiserCall) -> torch.Tensor:
            fit_c = torch.nn.functional.mse_loss(c.run(denoiser).float(), c.target.float())
            fit_s = torch.nn.functional.mse_loss(s.run(denoiser).float(), s.target.float())
            return fit_c + fit_s + lam * _cosine_penalty(m_c, m_s).to(fit_c.device)

        def full_objective() -> float:
            with torch.no_grad():
                pairs = list(zip(content_calls, style_calls))
                return sum(float(objective(c, s)) for c, s in pairs) / len(pairs)

        # 3. Adam on the coefficients only, one recorded step of each adapter per update (seeded choice).
        start = full_objective()
        optimizer = torch.optim.Adam([*m_c.values(), *m_s.values()], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        history = []
        with torch.enable_grad():
            for _ in tqdm(range(steps), desc="ZipLoRA", disable=not progress):
                i = int(torch.randint(len(content_calls), (1,), generator=gen))
                j = int(torch.randint(len(style_calls), (1,), generator=gen))
                loss = objective(content_calls[i], style_calls[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(float(loss.detach()))
        end = full_objective()
        result = ZipResult({p: m.detach().float().cpu().clone() for p, m in m_c.items()},
                           {p: m.detach().float().cpu().clone() for p, m in m_s.items()}, start, end, history)
    finally:
        unwrap_adapters_(denoiser)
    return result


# ---------------------------------------------------------------------------------------------------------
# Adapter files of the result
# ---------------------------------------------------------------------------------------------------------
def column_scaled_adapter(adapter: AdapterFile, mergers: dict[str, torch.Tensor]) -> AdapterFile:
    """``adapter`` with each layer's change ``dW diag(m)``, in the plain ``lora`` layout (``B``, ``A diag(m)``, scale 1)."""
    layers, rank = {}, 0
    for p, named in adapter.layers.items():
        B, A = adapter.method.lora_factors(named, adapter.config.scale)  # B (out, k), A (k, in)
        layers[p] = {"lora_B": B.float(), "lora_A": A.float() * mergers[p].to(A.device)}
        rank = max(rank, A.shape[0])
    config = AdapterConfig(method="lora", rank=rank, alpha=float(rank))
    return AdapterFile(config=config, component=adapter.component, layers=_padded(layers, rank),
                       metadata=dict(adapter.metadata), path=f"{adapter.path} (ZipLoRA columns)")


def _padded(layers: dict[str, dict[str, torch.Tensor]], rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Zero-pad every layer's ``lora_A`` rows and ``lora_B`` columns to ``rank``: ``B A`` is unchanged."""
    out = {}
    for p, t in layers.items():
        k = t["lora_A"].shape[0]
        out[p] = {"lora_A": torch.nn.functional.pad(t["lora_A"], (0, 0, 0, rank - k)),
                  "lora_B": torch.nn.functional.pad(t["lora_B"], (0, rank - k))}
    return out


def zipped_adapter(content: AdapterFile, style: AdapterFile, result: ZipResult, provenance: dict) -> AdapterFile:
    """The merged result ``dW_c diag(m_c) + dW_s diag(m_s)`` as one ``lora``-layout adapter (rank k_c + k_s)."""
    parts = [column_scaled_adapter(content, result.content), column_scaled_adapter(style, result.style)]
    layers: dict[str, dict[str, list]] = {}
    for part in parts:
        for p, t in part.layers.items():
            entry = layers.setdefault(p, {"lora_A": [], "lora_B": []})
            entry["lora_A"].append(t["lora_A"])
            entry["lora_B"].append(t["lora_B"])
    joined = {p: {"lora_A": torch.cat(t["lora_A"], 0), "lora_B": torch.cat(t["lora_B"], 1)} for p, t in layers.items()}
    rank = max(t["lora_A"].shape[0] for t in joined.values())
    config = AdapterConfig(method="lora", rank=rank, alpha=float(rank))
    targets = sorted({*json.loads(content.metadata.get("target_modules", "[]")), *json.loads(style.metadata.get("target_modules", "[]"))})
    meta = adapter_metadata(config, component=content.component, backbone=content.backbone or style.backbone,
                            base_model=content.base_model or style.base_model, targets=targets,
                            extra={"merge_strategy": "ziplora", "merged_from": json.dumps([content.path, style.path]),
                                   **{k: str(v) for k, v in provenance.items()}})
    return AdapterFile(config=config, component=content.component, layers=_padded(joined, rank), metadata=meta)


def default_prompt(flag: str, given: str | None, adapter: AdapterFile) -> str:
    """The prompt an adapter was trained on: the flag, else the file's ``instance_prompt`` metadata."""
    prompt = given or adapter.metadata.get("instance_prompt")
    if not prompt:
        raise UserError(f"{flag}: {adapter.path} records no instance_prompt; pass {flag}")
    return prompt


def learn_with_settings(pipe, denoiser, content: AdapterFile, style: AdapterFile, settings, render) -> tuple[ZipResult, dict]:
    """Run ``learn_mergers`` with a strategy's settings (``StrategySettings``) and the renders it learns from
    (``RenderSettings``: steps, size, seed); returns the result and its provenance for the file metadata."""
    content_prompt = default_prompt("--content_prompt", settings.content_prompt, content)
    style_prompt = default_prompt("--style_prompt", settings.style_prompt, style)
    result = learn_mergers(pipe, denoiser, content, style, content_prompt=content_prompt, style_prompt=style_prompt,
                           call_kwargs=render.call_kwargs(), steps=settings.ziplora_steps, lr=settings.ziplora_lr,
                           lam=settings.ziplora_lambda, seed=render.seed)
    provenance = {"ziplora_steps": settings.ziplora_steps, "ziplora_lr": settings.ziplora_lr,
                  "ziplora_lambda": settings.ziplora_lambda,
                  "ziplora_content_prompt": content_prompt, "ziplora_style_prompt": style_prompt,
                  "ziplora_objective_start": repr(result.objective_start), "ziplora_objective_end": repr(result.objective_end)}
    print(f"ZipLoRA objective {result.objective_start:.6g} -> {result.objective_end:.6g} after {settings.ziplora_steps} steps")
    return result, provenance

