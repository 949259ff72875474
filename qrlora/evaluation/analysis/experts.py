"""MoE expert usage during sampling (:func:`expert_usage`, :func:`run_expert_usage`) and the style vs content
usage difference (:func:`compare_usage`, :func:`run_compare_usage`); their flags: ``qrlora.cli.analysis``."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...files.checkpoint import ADAPTER_FILENAME, load_adapter
from ...core.devices import resolve_device, resolve_dtype
from ...errors import UserError
from .cli import _output_dir, write_json
from .metrics import cosine_similarity, summarize
from .ordering import block_of, order_layers
from .plots import _expert_labels, _figure, _layer_axis, save_step_curve, save_usage_heatmap


# =========================================================================================================
# MoE expert usage (analyze_moe_experts.py)
# =========================================================================================================
@dataclass
class ExpertUsage:
    """Mean gate weight per expert: ``per_step[layer][step]`` is an E-vector averaged over tokens and calls."""

    layers: list[str]
    num_experts: int
    per_step: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return max((len(v) for v in self.per_step.values()), default=0)

    def layer_mean(self) -> dict[str, list[float]]:
        """``{layer: [E]}``: the per-step means averaged over steps."""
        return {l: np.mean(np.asarray(self.per_step[l]), axis=0).tolist() for l in self.layers}

    def step_mean(self) -> list[list[float]]:
        """``[step][E]``: averaged over layers."""
        return np.mean(np.asarray([self.per_step[l] for l in self.layers]), axis=0).tolist()


def expert_usage(pipe, denoiser: torch.nn.Module, prompts: Sequence[str], *, adapter_name: str = "moe",
                 num_inference_steps: int = 10, guidance_scale: float = 0.0, height: int | None = None,
                 width: int | None = None, seed: int = 0, progress: bool = True) -> ExpertUsage:
    """Run ``pipe`` on ``prompts`` and record every MoE layer's softmax gate weights per denoising step.

    A forward pre-hook on each ``AdapterLinear`` holding ``adapter_name`` computes the gate probabilities of
    its input (``method.gate_probabilities``, (..., E)), averages them over every token of the batch, and adds
    them to the current step's running sum; the pipeline's ``callback_on_step_end`` advances the step. Each
    (prompt, step) call counts once, so the result is the mean over prompts of the token-mean gate weight.
    """
    from ...core.layers import adapter_layers

    targets = [(p, l) for p, l in adapter_layers(denoiser) if adapter_name in l.adapters]
    if not targets:
        raise UserError(f"no layer holds the adapter '{adapter_name}'")
    if not hasattr(targets[0][1].adapters[adapter_name].method, "gate_probabilities"):
        raise UserError(f"adapter '{adapter_name}' is not an MoE adapter (no gate)")
    num_experts = int(targets[0][1].adapters[adapter_name].tensors()["gate_weight"].shape[0])
    step = [0]
    sums: dict[str, dict[int, torch.Tensor]] = {p: {} for p, _ in targets}
    counts: dict[str, dict[int, int]] = {p: {} for p, _ in targets}

    def make_hook(path, layer):
        state = layer.adapters[adapter_name]

        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            with torch.no_grad():
                t = {k: v.float() for k, v in state.tensors().items()}
                probs = state.method.gate_probabilities(t, x.float()).reshape(-1, num_experts).mean(0)
            s = step[0]
            sums[path][s] = sums[path].get(s, 0) + probs.double()
            counts[path][s] = counts[path].get(s, 0) + 1

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(p, layer), with_kwargs=True) for p, layer in targets]
    bar = tqdm(total=len(prompts) * num_inference_steps, desc="denoising", unit="step", disable=not progress)

    def on_step_end(_pipe, i, _t, callback_kwargs):
        step[0] = i + 1
        bar.update(1)
        return callback_kwargs

    kwargs = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "output_type": "latent",
              "callback_on_step_end": on_step_end}
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    pipe.set_progress_bar_config(disable=True)
    try:
        for i, prompt in enumerate(prompts):
            step[0] = 0
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            with torch.no_grad():
                pipe(prompt=prompt, generator=generator, **kwargs)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    layers = order_layers(p for p, _ in targets)
    usage = ExpertUsage(layers=layers, num_experts=num_experts)
    for p in layers:
        steps = sorted(sums[p])
        usage.per_step[p] = [(sums[p][s] / counts[p][s]).cpu().tolist() for s in steps]
    return usage


@dataclass(frozen=True)
class ExpertUsageSettings:
    """One expert-usage run (``test/analyze_moe_experts.py``'s flags; ``prompts`` already read, default 'a dog')."""

    model_path: str
    lora_path: str
    prompts: tuple[str, ...] = ("a dog",)  # when neither --prompt nor --prompts_file gives one
    rank: int | None = None  # optional checks against the file
    num_experts: int | None = None
    num_inference_steps: int = 10
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    dtype: str = "auto"
    lora_name: str | None = None
    output_dir: str = "analysis_results"
    device: str = "auto"
    dpi: int = 150
    overwrite: bool = False

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise UserError(f"--num_inference_steps: must be positive, got {self.num_inference_steps}")


@dataclass(frozen=True)
class CompareUsageSettings:
    """One usage comparison (``test/compare_expert_usage.py``'s flags)."""

    content_usage: str
    style_usage: str
    content_name: str = "content"
    style_name: str = "style"
    output_dir: str = "analysis_result"
    dpi: int = 150
    overwrite: bool = False


def _load_pipeline(model_path: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    if (Path(model_path).is_absolute() or model_path.startswith((".", "~"))) and not Path(model_path).expanduser().exists():
        raise UserError(f"--model_path {model_path}: no such folder")
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; the old name works everywhere we support.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(model_path, torch_dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--model_path {model_path}: cannot load a diffusers pipeline ({reason})") from None


def run_expert_usage(settings: ExpertUsageSettings) -> dict:
    """Load the pipeline, attach the MoE adapter live, record usage; write the heatmap, step curve and JSON.

    Outputs in ``--output_dir``: ``expert_heatmap.png`` (layers x experts, mean gate weight over prompts and
    steps), ``expert_usage_per_step.png`` (mean over layers per expert vs step) and ``expert_usage.json``:
    ``{adapter, name, model, prompts, num_inference_steps, guidance_scale, seed, num_experts, rank, layers,
    block_kinds, usage: {layer: [E]}, expert_mean: [E], per_step: [[E] per step], per_layer_per_step:
    {layer: [[E] per step]}}``.
    """
    from ...core.inject import attach_adapter

    prompts = list(settings.prompts)
    adapter = load_adapter(settings.lora_path)
    if not adapter.method.uses_experts:
        raise UserError(f"--lora_path {settings.lora_path}: a {adapter.config.method} adapter; expert usage needs an "
                        "moe adapter (--lora_init_method moe)")
    if settings.rank is not None and settings.rank != adapter.config.rank:
        raise UserError(f"--rank {settings.rank}: the adapter {settings.lora_path} has rank {adapter.config.rank}")
    if settings.num_experts is not None and settings.num_experts != adapter.config.num_experts:
        raise UserError(f"--num_experts {settings.num_experts}: the adapter {settings.lora_path} has "
                        f"{adapter.config.num_experts} experts")
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    out = _output_dir(settings.output_dir, "expert_usage.json", settings.overwrite)
    pipe = _load_pipeline(settings.model_path, dtype)
    denoiser = getattr(pipe, adapter.component, None)
    if denoiser is None:
        raise UserError(f"--model_path {settings.model_path}: the pipeline has no {adapter.component}, which "
                        f"{settings.lora_path} adapts (different backbone?)")
    attach_adapter(denoiser, adapter.config, adapter.layers, adapter_name="moe", weight=1.0, source=str(settings.lora_path))
    pipe.to(device)
    name = settings.lora_name or adapter_label(settings.lora_path)
    usage = expert_usage(pipe, denoiser, prompts, num_inference_steps=settings.num_inference_steps,
                         guidance_scale=settings.guidance_scale, height=settings.height, width=settings.width, seed=settings.seed)
    means = usage.layer_mean()
    payload = {
        "adapter": str(settings.lora_path), "name": name, "model": str(settings.model_path), "prompts": prompts,
        "num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale, "seed": settings.seed,
        "num_experts": usage.num_experts, "rank": adapter.config.rank, "layers": usage.layers,
        "block_kinds": [block_of(l).kind for l in usage.layers], "usage": means,
        "expert_mean": np.mean(np.asarray([means[l] for l in usage.layers]), axis=0).tolist(),
        "per_step": usage.step_mean(), "per_layer_per_step": usage.per_step,
    }
    write_json(out / "expert_usage.json", payload)
    subtitle = f"{len(prompts)} prompt(s), {usage.num_steps} steps"
    save_usage_heatmap(out / "expert_heatmap.png", usage.layers, np.asarray([means[l] for l in usage.layers]),
                       title=f"Mean gate weight per expert: {name}\n{subtitle}", dpi=settings.dpi)
    save_step_curve(out / "expert_usage_per_step.png", np.asarray(payload["per_step"]),
                    title=f"Expert usage over denoising steps (mean over {len(usage.layers)} layers): {name}",
                    dpi=settings.dpi)
    out.publish()
    print("mean gate weight per expert (over layers, prompts, steps):")
    for e, v in enumerate(payload["expert_mean"]):
        print(f"  expert {e}: {v:.4f}")
    print(f"wrote expert_heatmap.png, expert_usage_per_step.png and expert_usage.json to {out}")
    return payload


def adapter_label(path: str | os.PathLike) -> str:
    """A short label for an adapter file: its run folder for trainer outputs (``run`` or ``run/checkpoint-500``
    for ``.../pytorch_lora_weights.safetensors``), else the file name without extension."""
    p = Path(path).resolve()
    if p.name != ADAPTER_FILENAME:
        return p.stem
    if p.parent.name.startswith("checkpoint-"):
        return f"{p.parent.parent.name}/{p.parent.name}"
    return p.parent.name


# =========================================================================================================
# Style vs content expert usage (compare_expert_usage.py)
# =========================================================================================================
def _load_usage(path: str, flag: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "expert_usage.json"
    try:
        data = json.loads(p.read_text())
    except OSError:
        raise UserError(f"{flag} {p}: no such file (expected expert_usage.json from analyze_moe_experts.py)") from None
    except ValueError:
        raise UserError(f"{flag} {p}: not JSON (expected expert_usage.json from analyze_moe_experts.py)") from None
    if not isinstance(data, dict) or not isinstance(data.get("usage"), dict) or "num_experts" not in data:
        raise UserError(f"{flag} {p}: not an expert_usage.json (no 'usage' / 'num_experts')")
    return data


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same usage, 1 = disjoint experts)."""
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return float(min(1.0, max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))))


def compare_usage(content: Mapping, style: Mapping, *, names=("content", "style")) -> dict:
    """Difference (content - style) of two usage records over their common layers, in depth order.

    Returns ``{layers, num_experts, names, global_cosine, per_layer: {layer: {content, style, diff, cosine, jsd}},
    per_expert: {content, style, diff}, layer_cosine: stats, layer_jsd: stats}`` (cosine as
    :func:`cosine_similarity`; ``jsd`` = Jensen-Shannon divergence in bits of the two gate distributions).
    """
    if int(content["num_experts"]) != int(style["num_experts"]):
        raise UserError(f"--style_usage: {style['num_experts']} experts but --content_usage has "
                        f"{content['num_experts']}; compare adapters with the same expert count")
    layers = order_layers(set(content["usage"]) & set(style["usage"]))
    if not layers:
        raise UserError("--content_usage and --style_usage: no layer in common (different base models?)")
    c = np.asarray([content["usage"][l] for l in layers], dtype=np.float64)
    s = np.asarray([style["usage"][l] for l in layers], dtype=np.float64)
    if not (np.isfinite(c).all() and np.isfinite(s).all()):
        raise UserError("--content_usage/--style_usage: usage values hold NaN or inf")
    per_layer = {}
    for i, l in enumerate(layers):
        per_layer[l] = {"content": c[i].tolist(), "style": s[i].tolist(), "diff": (c[i] - s[i]).tolist(),
                        "cosine": cosine_similarity(torch.from_numpy(c[i]), torch.from_numpy(s[i])),
                        "jsd": _jensen_shannon(c[i], s[i])}
    return {
        "names": list(names), "layers": layers, "num_experts": int(content["num_experts"]),
        "global_cosine": cosine_similarity(torch.from_numpy(c), torch.from_numpy(s)),
        "per_layer": per_layer,
        "per_expert": {"content": c.mean(0).tolist(), "style": s.mean(0).tolist(), "diff": (c - s).mean(0).tolist()},
        "layer_cosine": summarize(v["cosine"] for v in per_layer.values()),
        "layer_jsd": summarize(v["jsd"] for v in per_layer.values()),
    }


def run_compare_usage(settings: CompareUsageSettings) -> dict:
    """Write ``usage_difference.png`` (difference heatmap + per-expert bars) and ``usage_comparison.json``."""
    names = (settings.content_name, settings.style_name)
    result = compare_usage(_load_usage(settings.content_usage, "--content_usage"),
                           _load_usage(settings.style_usage, "--style_usage"), names=names)
    out = _output_dir(settings.output_dir, "usage_comparison.json", settings.overwrite)
    write_json(out / "usage_comparison.json", result)
    layers = result["layers"]
    diff = np.asarray([result["per_layer"][l]["diff"] for l in layers])
    fig = _figure((max(10.0, 1.0 * result["num_experts"] + 9), max(4.5, min(40.0, 0.2 * len(layers) + 2))))
    ax_map, ax_bar = fig.subplots(1, 2, width_ratios=[1.2, 1.0])
    lim = float(np.abs(diff).max()) or 1.0
    im = ax_map.imshow(diff, aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax_map, label=f"gate weight: {names[0]} (+) vs {names[1]} (-)")
    ax_map.set_xticks(range(diff.shape[1]))
    ax_map.set_xticklabels(_expert_labels(diff.shape[1]), rotation=45 if diff.shape[1] > 4 else 0)
    ax_map.set_xlabel("expert (singular-spectrum slice: top -> tail)")
    _layer_axis(ax_map, layers)
    ax_map.set_title(f"Usage difference ({names[0]} - {names[1]}) per layer")
    e = np.arange(result["num_experts"])
    ax_bar.bar(e - 0.2, result["per_expert"]["content"], width=0.4, label=names[0], color="C0")
    ax_bar.bar(e + 0.2, result["per_expert"]["style"], width=0.4, label=names[1], color="C1")
    ax_bar.axhline(1.0 / result["num_experts"], color="grey", ls=":", label="uniform")
    ax_bar.set_xticks(e)
    ax_bar.set_xticklabels(_expert_labels(result["num_experts"]), rotation=45 if result["num_experts"] > 4 else 0)
    ax_bar.set_xlabel("expert")
    ax_bar.set_ylabel("mean gate weight over layers")
    top = max(max(result["per_expert"]["content"]), max(result["per_expert"]["style"]), 1.0 / result["num_experts"])
    ax_bar.set_ylim(0.0, 1.3 * top)  # head room for the legend above the bars
    ax_bar.set_title("Mean usage per expert")
    ax_bar.legend(fontsize=8, loc="upper center", ncol=3)
    fig.suptitle(f"Expert usage, {names[0]} vs {names[1]}: global cosine {result['global_cosine']:.3f}, "
                 f"mean JS divergence {result['layer_jsd']['mean']:.3f} bits")
    fig.savefig(out / "usage_difference.png", dpi=settings.dpi)
    out.publish()
    print(f"global cosine similarity of usage: {result['global_cosine']:.4f} (1 = identical usage)")
    print(f"per-layer JS divergence: mean {result['layer_jsd']['mean']:.4f}, max {result['layer_jsd']['max']:.4f} bits")
    print(f"{'expert':<8}{names[0]:>12}{names[1]:>12}{'diff':>10}")
    for i in range(result["num_experts"]):
        pe = result["per_expert"]
        print(f"E{i:<7}{pe['content'][i]:>12.4f}{pe['style'][i]:>12.4f}{pe['diff'][i]:>+10.4f}")
    print(f"wrote usage_difference.png and usage_comparison.json to {out}")
    return result
