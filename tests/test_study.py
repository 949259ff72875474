"""The disentanglement study (issue 19): its statistics, its condition table, resume, and the TIES / DARE strategies.

No test asserts a study result: the study is research, its numbers live in bench/reports/world_study.*.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft.utils.merge_utils import dare_linear, ties

from qrlora.files.checkpoint import AdapterFile
from qrlora.core.decompose import layer_seed
from qrlora.core.methods import METHODS, AdapterConfig
from qrlora.merging.settings import RenderSettings, StrategySettings
from qrlora.merging.strategies import STRATEGIES
from qrlora.toy.world.study import (CONDITIONS, StudyPlan, aggregate, layer_mechanism, pooled_rate,
                                    subspace_overlap, token_mechanism, wilson_interval, word_positions)


# ---- statistics -------------------------------------------------------------------------------------------
def test_wilson_interval_matches_the_hand_computed_value():
    # 3 of 10, z = 1.96: center (0.3 + 1.96^2 / 20) / (1 + 1.96^2 / 10) = 0.35551, half-width
    # 1.96 sqrt(0.021 + 1.96^2 / 400) / 1.38415 = 0.24773 (Brown, Cai & DasGupta 2001, table 1: [0.108, 0.603]).
    low, high = wilson_interval(3, 10)
    assert low == pytest.approx(0.10779, abs=2e-5) and high == pytest.approx(0.60322, abs=2e-5)
    low, high = wilson_interval(0, 32)  # 0%: the interval is not empty, its top is z^2 / (n + z^2)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (32 + 1.959964 ** 2), rel=1e-6)
    assert wilson_interval(32, 32)[1] == 1.0
    for n in (16, 48, 80):  # the bounds hold the rate itself, exactly, at 0 and at 1 too (no rounding past it)
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_pooled_rate_pools_samples_and_keeps_the_seed_spread():
    rate = pooled_rate([27, 19, 14], [32, 32, 32])
    assert rate["rate"] == pytest.approx(60 / 96)
    assert (rate["ci_low"], rate["ci_high"]) == wilson_interval(60, 96)
    assert rate["per_seed"] == [27 / 32, 19 / 32, 14 / 32]
    assert rate["seed_min"] == 14 / 32 and rate["seed_max"] == 27 / 32 and rate["seed_std"] > 0


def _cell(seed, both_at_one, best_elsewhere, samples=8):
    grid = [{"content_weight": wc, "style_weight": ws, "content": samples, "style": samples,
             "both": both_at_one if (wc, ws) == (1.0, 1.0) else best_elsewhere if (wc, ws) == (1.25, 1.25) else 0}
            for wc in (1.0, 1.25) for ws in (1.0, 1.25)]
    return {"seed": seed, "samples": samples, "grid": grid, "own_content": samples, "own_style": samples - 1,
            "content_alone_merged_prompt": 1, "style_alone_merged_prompt": 2,
            "mechanism": {"abs_cos_dw": 0.1 * (seed + 1), "output_alignment": None}, "seconds": 1.0}


def test_aggregate_reads_the_headline_cell_the_best_per_seed_and_the_best_fixed_cell():
    row = aggregate(CONDITIONS["triu_deltaR"], [_cell(1, 2, 5), _cell(0, 4, 1)])
    assert row["seeds"] == [0, 1]
    assert row["both_at_1_1"]["per_seed"] == [4 / 8, 2 / 8]
    assert row["best_both"]["per_seed"] == [4 / 8, 5 / 8]  # seed 0's best is (1, 1), seed 1's is (1.25, 1.25)
    assert row["best_fixed_cell"]["weights"] == [1.0, 1.0] and row["best_fixed_cell"]["rate"] == 6 / 16
    assert row["own_style"]["rate"] == 14 / 16
    assert row["content_alone_merged_prompt"]["rate"] == 2 / 16 and row["style_alone_merged_prompt"]["rate"] == 4 / 16
    assert row["mechanism"]["abs_cos_dw"] == pytest.approx(0.15) and row["mechanism"]["output_alignment"] is None


# ---- the condition table ----------------------------------------------------------------------------------
def test_the_table_declares_what_the_issue_asks():
    names = set(CONDITIONS)
    static = [m for m, method in METHODS.items() if method.static]
    assert set(static) <= {c.method for c in CONDITIONS.values() if c.group in ("method", "basis", "frozen side")}
    assert {c.rank for c in CONDITIONS.values() if c.method == "triu_deltaR"} >= {4, 8, 16}
    assert len({c.learning_rate for c in CONDITIONS.values() if c.method == "triu_deltaR" and c.group in ("method", "learning rate")}) >= 3
    assert {c.steps for c in CONDITIONS.values() if c.method == "triu_deltaR"} >= {40, 100, 300, 1000}
    assert {c.merge for c in CONDITIONS.values()} == set(STRATEGIES)
    assert {"triu_random_q_shared", "triu_random_q_distinct", "triu_disjoint_singular", "lora_frozen_b",
            "triu_shared_seed", "triu_all_linears", "triu_context_only", "triu_image_only"} <= names
    headline = [c for c in CONDITIONS.values() if c.headline]
    assert {c.method for c in headline} == {"triu_deltaR", "lora"} and all(len(c.seeds()) == 5 for c in headline)
    assert all(len(c.seeds()) >= 3 for c in CONDITIONS.values())


def test_the_frozen_side_conditions_of_issue_32():
    """Input-frozen conditions with >= 5 seeds; each adapter pair's frozen input bases are what the name says."""
    side = {c.name: c for c in CONDITIONS.values() if c.group == "frozen side"}
    assert set(side) == {"ortho_adapt", "ortho_adapt_shared", "ortho_adapt_gaussian", "qr_input_frozen",
                         "qr_input_frozen_disjoint", "triu_qr_input_frozen"}
    assert all(len(c.seeds()) >= 5 for c in side.values())
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))

    def input_bases(name):
        c = side[name]
        out = []
        for overrides in (dict(c.overrides), {**dict(c.overrides), **dict(c.style_overrides)}):
            cfg = AdapterConfig(method=c.method, rank=c.rank, basis=overrides.get("qr_basis"),
                                basis_offset=overrides.get("qr_basis_offset", 0),
                                basis_seed=overrides.get("qr_basis_seed", 0))
            d = METHODS[c.method].lora_factors(METHODS[c.method].initialize(w, cfg, "blk.lin"), 1.0)[1]  # A (r x in)
            out.append(torch.linalg.qr(d.T)[0])
        return out

    for name, expected in (("ortho_adapt", 0.0), ("ortho_adapt_shared", 1.0), ("qr_input_frozen", 1.0),
                           ("qr_input_frozen_disjoint", 0.0), ("triu_qr_input_frozen", 1.0)):
        assert subspace_overlap(*input_bases(name)) == pytest.approx(expected, abs=1e-4), name
    assert 0.05 < subspace_overlap(*input_bases("ortho_adapt_gaussian")) < 0.9  # independent, neither equal nor disjoint


def test_merge_only_conditions_share_the_trained_pair():
    plan = StudyPlan([CONDITIONS["triu_deltaR"], CONDITIONS["triu_deltaR_ties"], CONDITIONS["triu_shared_seed"]],
                     {"triu_deltaR": [0, 1], "triu_deltaR_ties": [0, 1], "triu_shared_seed": [0]})
    assert len(plan.cells()) == 5
    assert [(c.name, s) for c, s in plan.pairs()] == [("triu_deltaR", 0), ("triu_deltaR", 1), ("triu_shared_seed", 0)]


# ---- mechanism ------------------------------------------------------------------------------------------------
def test_subspace_overlap_and_layer_mechanism():
    q, _ = torch.linalg.qr(torch.randn(12, 4, generator=torch.Generator().manual_seed(0)))
    assert subspace_overlap(q, q) == pytest.approx(1.0)
    assert subspace_overlap(q[:, :2], q[:, 2:]) == pytest.approx(0.0, abs=1e-6)
    w = torch.randn(12, 10)
    a, b = q[:, :2] @ torch.randn(2, 10), q[:, :2] @ torch.randn(2, 10)  # one column space, two row spaces
    m = layer_mechanism(a, b, w)
    assert m["column_overlap"] == pytest.approx(1.0, abs=1e-5) and m["row_overlap"] < 1
    assert m["content_dw_over_w"] == pytest.approx(float(a.norm() / w.norm()))
    assert layer_mechanism(torch.zeros(12, 10), b, w) is None  # a zero dW has no direction: left out


def _adapter(dw: torch.Tensor) -> AdapterFile:
    """A LoRA adapter file in memory with ``B A = dW`` (rank = dW's width in full)."""
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    r = int((s > 1e-6).sum())
    return AdapterFile(AdapterConfig(method="lora", rank=r, alpha=float(r)),
                       layers={"blk.lin": {"lora_B": u[:, :r] * s[:r], "lora_A": vh[:r]}})


def test_token_mechanism_reads_each_word_position():
    w = torch.eye(6)
    x = torch.eye(6)[:5]  # 5 context tokens, token t = e_t
    content = _adapter(torch.diag(torch.tensor([0.0, 2.0, 0.0, 0.0, 0.0, 0.0])))  # acts on token 1 only
    style = _adapter(torch.diag(torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 0.0])))  # acts on token 3 only
    groups = {"content_word": [1], "style_word": [3], "rest": [0, 2, 4]}
    m = token_mechanism({"blk.lin": x}, content, style, {"blk.lin": w}, groups, context_length=5)
    assert m["content_at_content_word"] == pytest.approx(2.0) and m["content_at_style_word"] == 0
    assert m["style_at_style_word"] == pytest.approx(3.0) and m["style_at_rest"] == 0
    assert m["output_alignment"] == pytest.approx(0.0)
    assert word_positions(str.split, "a heart in checker style", "heart", "circle") == [1]


# ---- TIES and DARE are PEFT's functions, applied per layer ---------------------------------------------------
@pytest.mark.parametrize("name", ["ties", "dare"])
def test_ties_and_dare_equal_peft_by_hand(name):
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential()
    model.add_module("blk", torch.nn.Module())
    model.blk.lin = torch.nn.Linear(10, 12, bias=False)
    original = model.blk.lin.weight.detach().clone()
    dc, ds = torch.randn(12, 3, generator=gen) @ torch.randn(3, 10, generator=gen), torch.randn(12, 10, generator=gen)
    content, style = _adapter(dc), _adapter(ds)
    settings = StrategySettings(merge_density=0.4, ties_majority_sign="total")
    strategy = STRATEGIES[name](None, model, [content, style], None, (0, 1), settings, RenderSettings())
    strategy.apply([0.7, 1.2], num_steps=1)
    weights = torch.tensor([0.7, 1.2])
    # By hand: PEFT's function on the two dense dW (from the files' factors, as the merge sees them).
    deltas = [content.method.delta_weight(content.layers["blk.lin"], 1.0), style.method.delta_weight(style.layers["blk.lin"], 1.0)]
    if name == "ties":
        expected = ties(deltas, weights, 0.4, majority_sign_method="total")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(layer_seed(0, "blk.lin"))
            expected = dare_linear(deltas, weights, 0.4)
    assert torch.allclose(model.blk.lin.weight, original + expected, atol=1e-5)
    direct = original + 0.7 * deltas[0] + 1.2 * deltas[1]
    assert not torch.allclose(model.blk.lin.weight, direct, atol=1e-3)  # it is not the weighted sum
    strategy.merger.restore()
    assert torch.equal(model.blk.lin.weight, original)


# ---- the run: every condition trains, resume redoes nothing -------------------------------------------------
@pytest.mark.slow
def test_every_declared_condition_runs_one_step_on_the_world(tmp_path):
    from qrlora.cli.world_study import train_pair
    from qrlora.files.checkpoint import load_adapter
    from qrlora.toy.world.world import SHIPPED_WORLD, load_world

    world = load_world(SHIPPED_WORLD)
    for c, seed in StudyPlan(list(CONDITIONS.values()), {n: [0] for n in CONDITIONS}).pairs():
        pair = train_pair(str(SHIPPED_WORLD), c.name, seed, str(tmp_path), steps=1)
        content, style = (load_adapter(pair["paths"][r]) for r in ("content", "style"))
        assert content.config.method == style.config.method == c.method, c.name
        assert content.config.rank == (c.rank or world.flux_ratio_rank), c.name
        assert pair["seeds"]["style"] == (0 if c.shared_seed else 100), c.name
        if c.targets:
            assert all(any(p.endswith(t) for t in c.targets) for p in content.layers), c.name


@pytest.mark.slow
def test_study_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    from qrlora.cli import world as world_cli
    from qrlora.cli import world_study
    from qrlora.toy.world.world import SHIPPED_WORLD

    out = tmp_path / "study"
    run = dict(jobs=1, samples=1, command="test", grid=(1.0,), steps=1)
    names = ["triu_deltaR", "triu_deltaR_ties"]
    first = world_study.run_study(str(SHIPPED_WORLD), out, names, [0], **run)
    assert [r["name"] for r in first["conditions"]] == names
    assert (out / "world_study.json").exists() and (out / "world_study.md").exists() and (out / "world_study.png").exists()
    assert json.loads((out / "cells/triu_deltaR/seed0.json").read_text())["grid"][0]["content_weight"] == 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished pair was trained again")

    monkeypatch.setattr(world_cli, "train_adapter", no_training)
    # Interrupted after the pair but before the ties cell: only that cell is redone, from the stored pair.
    (out / "cells/triu_deltaR_ties/seed0.json").unlink()
    again = world_study.run_study(str(SHIPPED_WORLD), out, names, [0], **run)
    assert again["conditions"][0]["both_at_1_1"] == first["conditions"][0]["both_at_1_1"]
    assert (out / "cells/triu_deltaR_ties/seed0.json").exists()

    def no_merging(*args, **kwargs):
        raise AssertionError("a finished cell was merged again")

    monkeypatch.setattr("qrlora.merging.inference.MergedPipeline", no_merging)
    world_study.run_study(str(SHIPPED_WORLD), out, names, [0], **run)  # everything finished: read back

    with pytest.raises(Exception, match="other settings"):
        world_study.run_study(str(SHIPPED_WORLD), out, names, [0], **{**run, "samples": 2})


# ---- the basis controls the study trains with ------------------------------------------------------------------
def test_basis_controls_random_q_and_singular_offset():
    from qrlora.errors import UserError

    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    method = METHODS["triu_deltaR"]
    cfg = AdapterConfig(method="triu_deltaR", rank=4, basis="random", basis_seed=3)
    t = method.initialize(w, cfg, "blk.lin")
    assert torch.allclose(t["q"].T @ t["q"], torch.eye(4), atol=1e-5)  # orthonormal
    assert torch.allclose(t["q"] @ t["base_r"] * cfg.scale, t["q"] @ t["q"].T @ w, atol=1e-5)  # W's part in span Q
    same = method.initialize(w, cfg, "blk.lin")["q"]
    other = method.initialize(w, cfg.with_(basis_seed=4), "blk.lin")["q"]
    assert torch.equal(same, t["q"]) and subspace_overlap(other, t["q"]) < 0.9

    u = torch.linalg.svd(w, full_matrices=False)[0]
    shifted = method.initialize(w, AdapterConfig(method="triu_deltaR", rank=4, basis_offset=4), "blk.lin")["q"]
    assert subspace_overlap(shifted, u[:, 4:8]) == pytest.approx(1.0, abs=1e-4)
    assert subspace_overlap(shifted, u[:, :4]) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(UserError, match="--qr_basis"):
        AdapterConfig(method="lora", basis="random")


def test_lora_frozen_b_trains_a_only_from_zero():
    method = METHODS["lora_frozen_b"]
    cfg = AdapterConfig(method="lora_frozen_b", rank=4, seed=2)
    t = method.initialize(torch.randn(12, 10), cfg, "blk.lin")
    assert method.trainable == ("lora_A",) and "lora_B" in method.basis
    assert t["lora_A"].abs().sum() == 0 and t["lora_B"].abs().sum() > 0  # identity at init, B random
    assert not torch.equal(t["lora_B"], method.initialize(torch.randn(12, 10), cfg.with_(seed=3), "blk.lin")["lora_B"])


def test_trainer_flags_choose_the_basis_and_the_file_keeps_it(tiny_sd3, tmp_path):
    from conftest import REPO
    from qrlora.files.checkpoint import load_adapter, read_safetensors
    from qrlora.cli.train import main

    def train(out, *extra):
        return main(["--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                     "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "1",
                     "--max_sequence_length", "16", "--output_dir", str(out), "--rank", "4",
                     "--lora_init_method", "triu_deltaR", *extra])

    random = load_adapter(train(tmp_path / "random", "--qr_basis", "random", "--qr_basis_seed", "5"))
    assert (random.config.basis, random.config.basis_seed) == ("random", 5)
    top_path = train(tmp_path / "top")
    top = load_adapter(top_path)
    assert top.config.basis == "top" and "basis" not in read_safetensors(top_path)[1]  # default files: keys unchanged
    layer = sorted(top.layers)[0]
    assert subspace_overlap(random.layers[layer]["q"], top.layers[layer]["q"]) < 0.9


def test_readme_study_tables_are_the_committed_reports():
    from conftest import REPO
    from qrlora.toy.world.study import README_END, README_START, readme_block

    readme = (REPO / "docs/world.md").read_text()
    assert readme.count(README_START) == 1 and readme.count(README_END) == 1
    block = README_START + readme.split(README_START, 1)[1].split(README_END, 1)[0] + README_END
    assert block == readme_block(REPO / "bench/reports"), \
        "docs/world.md study tables differ from bench/reports/world_study*.json: run python -m bench.readme_table --write"


def test_verdict_reads_each_cell_and_draws_both_grids(tmp_path):
    from PIL import Image

    from qrlora.toy.world import data
    from qrlora.toy.world.verdict import read_grid, verdict_figure, verdict_line
    from qrlora.toy.world.world import SHIPPED_WORLD, load_world

    world = load_world(SHIPPED_WORLD)
    grids = {}
    for label, pairs in (("A", [("heart", "checker"), ("circle", "flat")]), ("B", [("heart", "flat"), ("heart", "checker")])):
        folder = tmp_path / label
        folder.mkdir()
        for (shape, style), name in zip(pairs, ("inference_s0.00_c1.00.png", "inference_s1.00_c1.00.png")):
            Image.fromarray(data.render_set([(shape, style)], base_seed=7)[0]).save(folder / name)
        grids[label] = read_grid(world, folder, world.new_shape, world.new_style)
    assert [c.right for c in grids["A"]] == [True, False] and [c.right for c in grids["B"]] == [False, True]
    assert (grids["A"][0].style_weight, grids["A"][0].content_weight) == (0.0, 1.0)
    assert verdict_line(grids) == "A: both right in 1/2 cells; B: both right in 1/2 cells"
    verdict_figure(grids, "a heart in checker style", tmp_path / "verdict.png")
    assert Image.open(tmp_path / "verdict.png").size[0] > 400
