"""The disentanglement study on a built world: named conditions, statistics with intervals, the mechanism.

Does a content adapter and a style adapter, each trained alone, still do their job when merged? The study
answers with the world's classifier (``qrlora.toy.world.experiment.Sampler``) over seeds and conditions, declared
once in ``CONDITIONS``. The run itself (training through ``qrlora.training.trainer``, merging through ``MergedPipeline``,
one folder per (condition, seed), resume, ``--jobs``) is ``qrlora.cli.world_study``; this module holds what is
pure: the table, the Wilson interval, the aggregation, the mechanism measurements and the report.

Rates are pooled over every sample of every seed (``k / n``) with a 95% Wilson score interval; the seed-to-seed
spread is reported beside them (``per_seed``), because one seed misleads (LoRA's both-correct rate at (1, 1)
ranged 44-84% over three seeds in the first measurement, issue 19).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ...core.methods import METHODS

WEIGHT_GRID = (0.5, 0.75, 1.0, 1.25)  # every (content, style) pair of these; (1, 1) is the headline cell
HEADLINE_SEEDS = 5  # the rows a user reads first get five seeds, the others three
STYLE_SEED_OFFSET = 100  # the style adapter trains with seed + this (the experiment trained both with one seed)
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Condition:
    """One named setting of the study: how both adapters of a pair train and how they merge.

    Every field not given is the experiment's setting (``qrlora.toy.world.experiment``: rank 4, lr 1e-2, 100 steps,
    batch 4, direct merge). ``overrides`` are trainer settings for both adapters, ``style_overrides`` for the style
    adapter only (a basis control that gives the two adapters different frozen bases); the report shows them as the
    trainer's flags.
    """

    name: str
    method: str = "triu_deltaR"
    rank: int = 4  # 0: the world's FLUX-ratio rank (r / width = 64 / 3072, ``World.flux_ratio_rank``)
    learning_rate: float = 1e-2
    steps: int = 100
    batch_size: int = 4
    accumulation: int = 1
    targets: tuple[str, ...] = ()  # --lora_layers; () = the backbone's default (the 8 attention projections)
    overrides: tuple[tuple[str, object], ...] = ()  # TrainSettings fields for both adapters
    style_overrides: tuple[tuple[str, object], ...] = ()  # ... for the style adapter only
    merge: str = "direct"
    shared_seed: bool = False  # both adapters train with the same seed (the experiment's choice)
    headline: bool = False
    seed_count: int | None = None  # seeds it runs by default (None: 5 for headline rows, 3 for the others)
    sequential: bool = False  # the style adapter trains with the content adapter merged in, frozen (--base_adapter)
    group: str = "method"
    note: str = ""

    def training_key(self) -> tuple:
        """What decides the trained pair: conditions that differ only in how they merge share one pair."""
        return (self.method, self.rank, self.learning_rate, self.steps, self.batch_size, self.accumulation,
                self.targets, self.overrides, self.style_overrides, self.shared_seed) + (
                    # appended only when set, so every pair trained before the field existed keeps its folder digest
                    (True,) if self.sequential else ())

    def settings(self) -> dict:
        """The JSON-able settings of the report (every field but the name)."""
        shown_as = {"overrides": "flags", "style_overrides": "style_flags"}  # the trainer's flags, as a user types them
        out = {shown_as.get(key, key): ([text for name, v in value for text in (f"--{name}", str(v))]
                                         if key in shown_as else value)
               for key, value in asdict(self).items() if key != "name"}
        out["targets"] = list(self.targets) or "default (attention projections)"
        return out

    def seeds(self, requested: list[int] | None = None) -> list[int]:
        """The seeds this condition runs: the requested ones, or ``0 .. seed_count - 1`` (by default 0..4 for headline
        rows and 0..2 otherwise)."""
        if requested is not None:
            return list(requested)
        return list(range(self.seed_count or (HEADLINE_SEEDS if self.headline else 3)))


ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
IMAGE_STREAM = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
CONTEXT_STREAM = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
ALL_LINEARS = ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                           "norm1.linear", "norm1_context.linear")
PUBLISHED = dict(learning_rate=1e-4, steps=1000, batch_size=1, accumulation=4)
FROZEN_SIDE = dict(group="frozen side", seed_count=HEADLINE_SEEDS)  # issue 32: >= 5 seeds in both worlds


def _conditions() -> dict[str, Condition]:
    c = [
        # -- every static method and LoRA at the experiment's settings --------------------------------------
        Condition("triu_deltaR", headline=True, note="the experiment's setting"),
        Condition("lora", method="lora", headline=True, note="the experiment's setting"),
        Condition("deltaR", method="deltaR"),
        Condition("qr", method="qr"),
        Condition("svd", method="svd"),
        Condition("ica", method="ica", note="the trainer's lr x10 as in the experiment (experiment.LR_FACTOR)"),
        # -- training recipe -------------------------------------------------------------------------------
        Condition("triu_rank8", rank=8, group="rank"),
        Condition("triu_rank16", rank=16, group="rank"),
        Condition("lora_rank16", method="lora", rank=16, group="rank"),
        Condition("triu_flux_ratio_rank", rank=0, group="rank", note="r / width as FLUX.1-dev's 64 / 3072"),
        Condition("lora_flux_ratio_rank", method="lora", rank=0, group="rank", note="r / width as FLUX.1-dev's 64 / 3072"),
        Condition("triu_lr3e-3", learning_rate=3.3e-3, group="learning rate"),
        Condition("triu_lr3e-2", learning_rate=3e-2, group="learning rate"),
        Condition("lora_lr3e-3", method="lora", learning_rate=3.3e-3, group="learning rate"),
        Condition("triu_steps40", steps=40, group="steps"),
        Condition("triu_steps300", steps=300, group="steps"),
        Condition("lora_steps300", method="lora", steps=300, group="steps"),
        Condition("triu_published", group="published schedule", **PUBLISHED,
                  note="lr 1e-4, 1000 steps, batch 1, accumulation 4 (the published wrappers)"),
        Condition("lora_published", method="lora", group="published schedule", **PUBLISHED),
        # -- which Linears --------------------------------------------------------------------------------
        Condition("triu_all_linears", targets=ALL_LINEARS, group="targets",
                  note="attention + feed-forward + adaLN Linears of every joint block"),
        Condition("triu_context_only", targets=CONTEXT_STREAM, group="targets", note="add_q/k/v_proj, to_add_out"),
        Condition("triu_image_only", targets=IMAGE_STREAM, group="targets", note="to_q/k/v, to_out.0"),
        Condition("lora_context_only", method="lora", targets=CONTEXT_STREAM, group="targets"),
        # -- basis controls --------------------------------------------------------------------------------
        Condition("triu_random_q_shared", overrides=(("qr_basis", "random"), ("qr_basis_seed", 0)), group="basis",
                  note="one random orthonormal Q shared by both adapters"),
        Condition("triu_random_q_distinct", overrides=(("qr_basis", "random"), ("qr_basis_seed", 0)),
                  style_overrides=(("qr_basis_seed", 1),), group="basis",
                  note="a different random orthonormal Q per adapter"),
        Condition("triu_disjoint_singular", style_overrides=(("qr_basis_offset", 4),), group="basis",
                  note="content: singular directions 1-4, style: 5-8 (disjoint column spaces)"),
        Condition("lora_frozen_b", method="lora_frozen_b", group="basis",
                  note="LoRA with a frozen random B (different per adapter), trained through A only"),
        # -- which side is frozen (issue 32): the input side instead of QR-LoRA's output side -----------------
        Condition("ortho_adapt", method="ortho_adapt", style_overrides=(("qr_basis_offset", 4),), **FROZEN_SIDE,
                  note="Orthogonal Adaptation: frozen random orthonormal input bases, content columns 1-4 and style "
                       "5-8 of one orthogonal matrix; learned zero-initialised output side"),
        Condition("ortho_adapt_shared", method="ortho_adapt", **FROZEN_SIDE,
                  note="the control: one random orthonormal input basis shared by both adapters"),
        Condition("ortho_adapt_gaussian", method="ortho_adapt", overrides=(("qr_basis", "gaussian"),),
                  style_overrides=(("qr_basis_seed", 1),), **FROZEN_SIDE,
                  note="independent N(0, 1/in) input bases, the paper's cheaper option"),
        Condition("qr_input_frozen", method="qr_input_frozen", **FROZEN_SIDE,
                  note="QR of W_r^T: the top-4 right singular basis frozen and shared, dW = s dR^T Q^T learned"),
        Condition("qr_input_frozen_disjoint", method="qr_input_frozen", style_overrides=(("qr_basis_offset", 4),),
                  **FROZEN_SIDE, note="content on right singular directions 1-4, style on 5-8"),
        Condition("triu_qr_input_frozen", method="triu_qr_input_frozen", **FROZEN_SIDE,
                  note="the exact transpose of triu_deltaR (the issue's triu_deltaQ): dR upper-triangular"),
        # -- the ceiling a merge could reach (issue 32): the style adapter trained on top of the content one --
        Condition("triu_sequential", sequential=True, group="sequential", seed_count=HEADLINE_SEEDS,
                  note="the style adapter trains with the content adapter merged in, frozen (--base_adapter); at (1, 1) "
                       "the merge is the model the style adapter was trained in"),
        Condition("lora_sequential", method="lora", sequential=True, group="sequential", seed_count=HEADLINE_SEEDS,
                  note="as triu_sequential, for LoRA"),
        # -- merge strategies (reuse the pairs of the rows above) -----------------------------------------
        *(Condition(f"{m}_{s}", method=m, merge=s, group="merge strategy")
          for m in ("triu_deltaR", "lora") for s in ("ziplora", "klora", "ties", "dare")),
        # -- the experiment's shared seed --------------------------------------------------------------------
        Condition("triu_shared_seed", shared_seed=True, group="seed",
                  note="both adapters train with one seed (same noise and timesteps), as the experiment did"),
        Condition("lora_shared_seed", method="lora", shared_seed=True, group="seed",
                  note="one seed: the two LoRA adapters also start from the same A"),
    ]
    table = {x.name: x for x in c}
    assert len(table) == len(c), "condition names must be unique"
    return table


CONDITIONS: dict[str, Condition] = _conditions()


@dataclass(frozen=True)
class QuickStudy:
    """``study --quick``: the frozen-side conditions with their output-frozen and learned-output baselines, one seed,
    fewer steps, a few samples, weights (1, 1) only: minutes on two cores, to see the conditions run (not a result)."""

    conditions: tuple[str, ...] = tuple(n for n, c in CONDITIONS.items() if c.group == "frozen side") + ("triu_deltaR", "lora")
    seeds: tuple[int, ...] = (0,)
    samples: int = 4
    steps: int = 30
    grid: tuple[float, ...] = (1.0,)


QUICK = QuickStudy()


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate ``successes / total`` (Wilson 1927; Brown, Cai, DasGupta 2001).

    Unlike the normal interval it stays inside [0, 1] and is not empty at 0% or 100%.
    """
    if total <= 0:
        return (float("nan"), float("nan"))
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # Clamped to [0, p] and [p, 1]: at 0 and 1 the bound equals p exactly, which rounding can miss by 1e-17.
    return (min(p, max(0.0, center - half)), max(p, min(1.0, center + half)))


def pooled_rate(counts: list[int], totals: list[int]) -> dict:
    """``rate``, ``ci_low``, ``ci_high`` over all samples, ``per_seed`` rates and their spread."""
    k, n = int(sum(counts)), int(sum(totals))
    low, high = wilson_interval(k, n)
    per_seed = [c / t for c, t in zip(counts, totals)]
    return {"rate": k / n if n else float("nan"), "ci_low": low, "ci_high": high, "successes": k, "samples": n,
            "per_seed": per_seed, "seed_min": min(per_seed), "seed_max": max(per_seed),
            "seed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0}


def aggregate(condition: Condition, cells: list[dict]) -> dict:
    """One report row from the (condition, seed) results ``cells`` (as ``run_cell`` writes them)."""
    cells = sorted(cells, key=lambda c: c["seed"])
    n = [c["samples"] for c in cells]

    def at(cell, weights):
        return next(g for g in cell["grid"] if (g["content_weight"], g["style_weight"]) == weights)

    one = (1.0, 1.0)  # the headline cell: both adapters at full weight, as a user merges them first
    row = {"name": condition.name, "method": condition.method, "settings": condition.settings(),
           "seeds": [c["seed"] for c in cells],
           "both_at_1_1": pooled_rate([at(c, one)["both"] for c in cells], n),
           "content_at_1_1": pooled_rate([at(c, one)["content"] for c in cells], n),
           "style_at_1_1": pooled_rate([at(c, one)["style"] for c in cells], n),
           # Per seed the best cell of the grid: what a user who tunes the weights on one pair gets (optimistic).
           "best_both": pooled_rate([max(g["both"] for g in c["grid"]) for c in cells], n),
           "own_content": pooled_rate([c["own_content"] for c in cells], n),
           "own_style": pooled_rate([c["own_style"] for c in cells], n),
           # One adapter alone (weight 1) on the merged prompt `a heart in checker style`: its own attribute's rate.
           "content_alone_merged_prompt": pooled_rate([c["content_alone_merged_prompt"] for c in cells], n),
           "style_alone_merged_prompt": pooled_rate([c["style_alone_merged_prompt"] for c in cells], n)}
    # The one cell that is best over all seeds together (not tuned per seed).
    weights = [(g["content_weight"], g["style_weight"]) for g in cells[0]["grid"]]
    best_fixed = max(weights, key=lambda w: sum(at(c, w)["both"] for c in cells))
    row["best_fixed_cell"] = {"weights": list(best_fixed), **pooled_rate([at(c, best_fixed)["both"] for c in cells], n)}
    mechanism = [c["mechanism"] for c in cells if c.get("mechanism")]
    row["mechanism"] = _mean_dicts(mechanism)
    row["seconds"] = round(sum(c.get("seconds", 0.0) for c in cells), 1)
    return row


def _mean_dicts(items: list[dict]) -> dict:
    """Key-wise mean over seeds of the scalar entries (None where every seed has none)."""
    out = {}
    for key in (items[0] if items else {}):
        values = [x[key] for x in items if isinstance(x.get(key), (int, float)) and not isinstance(x.get(key), bool)]
        out[key] = float(np.mean(values)) if values else None
    return out


# ---------------------------------------------------------------------------------------------------------
# Mechanism
# ---------------------------------------------------------------------------------------------------------
def _span(matrix: torch.Tensor, rel_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of the column and row spaces of ``matrix`` (out x in): ``U`` (out x k), ``V`` (in x k)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = int((s > rel_tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :k], vh[:k].T


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||A^T B||_F^2 / min(k_a, k_b)`` for orthonormal bases: 1 when one span contains the other, 0 when
    orthogonal, ``k / d`` in expectation for random k-dimensional subspaces of R^d."""
    k = min(a.shape[1], b.shape[1])
    return float((a.T @ b).pow(2).sum() / k) if k else float("nan")


def layer_mechanism(delta_c: torch.Tensor, delta_s: torch.Tensor, weight: torch.Tensor) -> dict | None:
    """Per layer: |cos dW|, column- and row-space overlap, ||dW|| / ||W|| of each adapter (None: a zero dW,
    which has no direction and is left out of every mean)."""
    nc, ns = delta_c.norm(), delta_s.norm()
    if nc == 0 or ns == 0:
        return None
    (uc, vc), (us, vs) = _span(delta_c), _span(delta_s)
    w = weight.float().norm()
    return {"abs_cos_dw": float((delta_c * delta_s).sum().abs() / (nc * ns)),
            "column_overlap": subspace_overlap(uc, us), "row_overlap": subspace_overlap(vc, vs),
            "content_dw_over_w": float(nc / w), "style_dw_over_w": float(ns / w)}


def weight_mechanism(content, style, weights: dict[str, torch.Tensor]) -> dict:
    """Means over the layers both adapters change (``content`` / ``style``: ``AdapterFile``; ``weights``: base
    ``W`` per layer path), with the number of layers left out because a ``dW`` is zero."""
    rows, dead = [], 0
    for path in sorted(set(content.layers) & set(style.layers)):
        dc = content.method.delta_weight(content.layers[path], content.config.scale)
        ds = style.method.delta_weight(style.layers[path], style.config.scale)
        row = layer_mechanism(dc, ds, weights[path])
        if row is None:
            dead += 1
        else:
            rows.append(row)
    out = {key: float(np.mean([r[key] for r in rows])) if rows else None
           for key in ("abs_cos_dw", "column_overlap", "row_overlap", "content_dw_over_w", "style_dw_over_w")}
    out["layers"] = len(rows)
    out["zero_dw_layers_left_out"] = dead
    return out


def word_positions(tokenize, prompt: str, word: str, replacement: str) -> list[int]:
    """Positions of ``word`` in ``tokenize(prompt)``: where the ids differ from the prompt with ``replacement``
    in its place (tokenizer-agnostic: works for whole-word and sub-word vocabularies)."""
    a, b = tokenize(prompt), tokenize(prompt.replace(word, replacement))
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def token_mechanism(inputs: dict[str, torch.Tensor], content, style, weights: dict[str, torch.Tensor],
                    groups: dict[str, list[int]], context_length: int) -> dict:
    """Per token, from the inputs ``x`` (T, in) each adapted Linear sees on the merged prompt (base weights):

    * ``{adapter}_at_{group}``: mean over context-stream layers of ``||dW x_t|| / ||W x_t||`` at the token
      positions of ``groups`` (the content word, the style word, the rest of the prompt): is an adapter's change
      concentrated on its own trigger word?
    * ``output_alignment``: mean over every adapted layer and token of ``|cos(dW_c x_t, dW_s x_t)|``: do the two
      adapters push the same hidden states in the same directions?

    A layer is context-stream when its input has ``context_length`` tokens (the world's 16 image tokens and 18
    prompt tokens differ, so no layer name is needed).
    """
    ratios = {f"{a}_at_{g}": [] for a in ("content", "style") for g in groups}
    alignment = []
    for path, x in inputs.items():
        if path not in content.layers or path not in style.layers:
            continue
        x = x.float()
        w = weights[path].float()
        base = (x @ w.T).norm(dim=-1).clamp_min(1e-12)  # (T,)
        outs = {name: x @ f.method.delta_weight(f.layers[path], f.config.scale).T  # (T, out)
                for name, f in (("content", content), ("style", style))}
        cos = torch.nn.functional.cosine_similarity(outs["content"], outs["style"], dim=-1, eps=1e-12)
        alignment.append(float(cos.abs().mean()))
        if x.shape[0] != context_length:
            continue
        for a in ("content", "style"):
            r = outs[a].norm(dim=-1) / base
            for g, positions in groups.items():
                if positions:
                    ratios[f"{a}_at_{g}"].append(float(r[positions].mean()))
    out = {k: (float(np.mean(v)) if v else None) for k, v in ratios.items()}
    out["output_alignment"] = float(np.mean(alignment)) if alignment else None
    return out


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def pct(rate: dict) -> str:
    """``12% [5-24]``: the pooled rate and its 95% interval."""
    return f"{100 * rate['rate']:.0f}% [{100 * rate['ci_low']:.0f}-{100 * rate['ci_high']:.0f}]"


def spread(rate: dict) -> str:
    return "/".join(f"{100 * r:.0f}" for r in rate["per_seed"])


def markdown(report: dict) -> str:
    """The docs/world.md table: one row per condition, pooled rates with 95% Wilson intervals and the per-seed rates."""
    s = report["settings"]
    lines = [f"`{report['command']}` on `{report['world']}` ({report['seconds'] / 60:.0f} core-min)  ",
             f"prompt `{report['prompt']}`; {s['samples']} samples per cell and seed; weight grid "
             f"{{{', '.join(f'{w:g}' for w in s['grid'])}}}^2; rates pooled over all samples with 95% Wilson intervals; "
             "per seed in the second line of each cell. own: each adapter alone (weight 1) on its own training prompt; "
             "alone, merged prompt: each adapter alone (weight 1) on the merged prompt, the rate of its own attribute. "
             "cos, col, row: mean over live layers of |cos dW|, column-space and row-space overlap of the two dW; "
             "sel: content adapter's ||dW x|| / ||W x|| at the style word / at its own word (1 = not selective); "
             "align: mean |cos(dW_c x, dW_s x)| on the merged prompt.",
             "",
             "| condition | method | both @ (1,1) | best both (per seed) | best fixed cell | own content | own style | content alone, merged prompt | style alone, merged prompt | cos | col | row | sel | align |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["conditions"]:
        m = row["mechanism"]
        f = lambda k: "-" if m.get(k) is None else f"{m[k]:.2f}"  # noqa: E731
        own, other = m.get("content_at_content_word"), m.get("content_at_style_word")
        sel = "-" if not own or other is None else f"{other / own:.2f}"
        b = row["best_fixed_cell"]
        lines.append(
            f"| {row['name']} | {row['method']} | {pct(row['both_at_1_1'])}<br>{spread(row['both_at_1_1'])} | "
            f"{pct(row['best_both'])}<br>{spread(row['best_both'])} | {pct(b)} at ({b['weights'][0]:g}, {b['weights'][1]:g}) | "
            f"{pct(row['own_content'])} | {pct(row['own_style'])} | {pct(row['content_alone_merged_prompt'])} | "
            f"{pct(row['style_alone_merged_prompt'])} | {f('abs_cos_dw')} | {f('column_overlap')} | "
            f"{f('row_overlap')} | {sel} | {f('output_alignment')} |")
    return "\n".join(lines) + "\n"


FAMILY_COLORS = {"QR-LoRA": "tab:blue", "LoRA": "tab:orange", "Orthogonal Adaptation": "tab:green"}


def family(method: str) -> str:
    """The published family of a report row's method (``Method.family``; a method this version lacks: its name)."""
    return METHODS[method].family if method in METHODS else method


def plot(report: dict, path) -> None:
    """Both-correct at (1, 1) and best-per-seed, with 95% intervals, one bar pair per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["conditions"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * len(rows) + 2), 4.2))
    for offset, key, label in ((-0.2, "both_at_1_1", "both correct at (1, 1)"), (0.2, "best_both", "best cell per seed")):
        r = np.array([row[key]["rate"] for row in rows])
        err = np.array([[row[key]["rate"] - row[key]["ci_low"], row[key]["ci_high"] - row[key]["rate"]] for row in rows]).T
        colors = [FAMILY_COLORS.get(family(row["method"]), "tab:gray") for row in rows]
        ax.bar(x + offset, r, 0.4, yerr=err, capsize=2, color=colors, alpha=1.0 if offset < 0 else 0.5,
               label=label)
    ax.set_xticks(x, [row["name"] for row in rows], rotation=70, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% Wilson interval)")
    ax.set_title(f"{report['prompt']}: blue QR-LoRA, orange LoRA, green Orthogonal Adaptation; dark (1, 1), "
                 "light best per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class StudyPlan:
    """Which (condition, seed) cells a study runs, in order, and which trained pairs they need."""

    conditions: list[Condition]
    seeds: dict[str, list[int]] = field(default_factory=dict)

    def cells(self) -> list[tuple[Condition, int]]:
        return [(c, s) for c in self.conditions for s in self.seeds[c.name]]

    def pairs(self) -> list[tuple[Condition, int]]:
        """One (condition, seed) per distinct trained pair (merge-only conditions share their training)."""
        seen, out = set(), []
        for c, s in self.cells():
            key = (c.training_key(), s)
            if key not in seen:
                seen.add(key)
                out.append((c, s))
        return out


def pair_folder_name(condition: Condition, seed: int) -> str:
    """A stable, readable folder name of a trained pair: the first condition's name that trains it + a digest."""
    import hashlib

    digest = hashlib.sha1(repr(condition.training_key()).encode()).hexdigest()[:8]
    return f"{condition.method}-{digest}/seed{seed}"


def study_summary(report_path) -> str:
    """One line from a committed report: the best QR-family and the best LoRA-family condition at (1, 1)."""
    import json
    from pathlib import Path

    try:
        report = json.loads(Path(report_path).read_text())
        rows = report["conditions"]
    except (OSError, ValueError, KeyError):
        from ...errors import UserError

        raise UserError(f"--study: {report_path} is not a readable world_study.json report") from None

    def best(family):
        return max((r for r in rows if family(r)), key=lambda r: r["both_at_1_1"]["rate"], default=None)

    qr = best(lambda r: family(r["method"]) == "QR-LoRA")
    lora = best(lambda r: family(r["method"]) == "LoRA")
    parts = [f"the study ({report_path}, {len(rows)} conditions, weights (1, 1)):"]
    for label, row in (("best QR-family condition", qr), ("best LoRA-family condition", lora)):
        if row is not None:
            parts.append(f"{label} {row['name']} {pct(row['both_at_1_1'])}")
    if qr is not None and lora is not None:
        if qr["both_at_1_1"]["ci_high"] < lora["both_at_1_1"]["ci_low"]:
            parts.append("no QR-LoRA setting it tried merges as well as LoRA, so this demo keeps the experiment's "
                         "settings (rank 4, lr 1e-2, 100 steps)")
        else:
            parts.append(f"QR-LoRA's {qr['name']} merges within LoRA's interval: train with its settings "
                         f"({qr['settings']}) to see it")
    return " ".join(parts[:1]) + " " + "; ".join(parts[1:])


README_START = "<!-- world study tables: generated by bench/readme_table.py from bench/reports/world_study*.json -->"
README_END = "<!-- end of world study tables -->"
REPORTS = ("world_study", "world_study_w256")  # the shipped world, then the larger one (when its report exists)


def readme_block(reports_dir) -> str:
    """The README's study tables (between ``README_START`` and ``README_END``) from the committed reports."""
    import json
    from pathlib import Path

    parts = [README_START, ""]
    for name in REPORTS:
        path = Path(reports_dir) / f"{name}.json"
        if path.is_file():
            report = json.loads(path.read_text())
            parts += [f"**`bench/reports/{name}.json`** (world width {report['world_width']}, "
                      f"{report['world_blocks']} blocks):", "", markdown(report)]
    return "\n".join(parts + [README_END])


FROZEN_SIDE_START = ("<!-- frozen-side tables: generated by bench/readme_table.py from bench/reports/world_study*.json -->")
FROZEN_SIDE_END = "<!-- end of frozen-side tables -->"
SIDE_ORDER = {"output": 0, "input": 1, "neither": 2}
SIDE_LABEL = {"output": "output (Q / B frozen)", "input": "input (R / B^T / A frozen)", "neither": "none (both learned)"}
SIDE_GROUPS = ("method", "basis", "frozen side")  # the rows at the experiment's settings that differ in the basis


def frozen_side_markdown(report: dict) -> str:
    """One world's table of issue 32: the conditions at the experiment's settings (every method, the basis controls
    and the frozen-side conditions) by which side of ``dW`` their method freezes (``Method.frozen_side``), with the
    merge at (1, 1), each adapter alone, and the mechanism: input overlap (row spaces of the two ``dW``), output
    overlap (column spaces) and output collision (``|cos(dW_c x, dW_s x)|`` on the merged prompt)."""
    rows = [r for r in report["conditions"]
            if r["settings"].get("group") in SIDE_GROUPS and r["settings"].get("merge") == "direct"
            and r["method"] in METHODS]
    rows.sort(key=lambda r: SIDE_ORDER[METHODS[r["method"]].frozen_side])
    lines = [f"World width {report['world_width']}, {report['world_blocks']} blocks (`{report['command']}`):", "",
             "| frozen side | condition | seeds | both @ (1,1) | best cell per seed | own content / own style | "
             "input overlap | output overlap | output collision |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["mechanism"]
        f = lambda k: "-" if m.get(k) is None else f"{m[k]:.2f}"  # noqa: E731
        lines.append(f"| {SIDE_LABEL[METHODS[r['method']].frozen_side]} | {r['name']} | {len(r['seeds'])} | "
                     f"{pct(r['both_at_1_1'])}<br>{spread(r['both_at_1_1'])} | {pct(r['best_both'])} | "
                     f"{100 * r['own_content']['rate']:.0f}% / {100 * r['own_style']['rate']:.0f}% | "
                     f"{f('row_overlap')} | {f('column_overlap')} | {f('output_alignment')} |")
    return "\n".join(lines) + "\n"


def frozen_side_block(reports_dir) -> str:
    """docs/world.md's frozen-side tables (between the markers) from the committed reports of both worlds."""
    import json
    from pathlib import Path

    parts = [FROZEN_SIDE_START, ""]
    for name in REPORTS:
        path = Path(reports_dir) / f"{name}.json"
        if path.is_file():
            parts += [frozen_side_markdown(json.loads(path.read_text()))]
    return "\n".join(parts + [FROZEN_SIDE_END])
