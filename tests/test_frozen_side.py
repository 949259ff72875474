"""Issue 32: the input-frozen methods (qr_input_frozen, triu_qr_input_frozen, ortho_adapt) and the study's quick mode.

That each of them learns on every backbone and that its diffusers export scores as the trainer's model is
``tests/test_learning.py`` (parametrised over the whole registry); here: what trains and what stays frozen through the
real trainer, the math of each frozen basis, and the quick study that runs the frozen-side conditions.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO, run_script
from qrlora.core.methods import METHODS, AdapterConfig
from qrlora.errors import UserError
from qrlora.toy.world.study import subspace_overlap

INPUT_FROZEN = ["qr_input_frozen", "triu_qr_input_frozen", "ortho_adapt"]


def _train(model, out, method, *extra, steps=3):
    from qrlora.cli.train import main

    return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                 "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", str(steps),
                 "--max_sequence_length", "16", "--output_dir", str(out), "--rank", "4", "--learning_rate", "1e-2",
                 "--lora_init_method", method, *extra])


@pytest.mark.parametrize("method", INPUT_FROZEN)
def test_the_trainer_moves_the_output_side_only(tiny_sd3, tmp_path, method):
    """After real training steps the frozen input basis (and R) equal a fresh initialisation, the output side moved,
    and ``dW``'s row space stays inside the frozen input basis."""
    import diffusers
    from qrlora.files.checkpoint import load_adapter

    extra = ("--qr_basis_offset", "4") if method == "ortho_adapt" else ()
    adapter = load_adapter(_train(tiny_sd3, tmp_path / "run", method, *extra))
    assert adapter.config.method == method
    base = diffusers.SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    m = METHODS[method]
    moved = 0
    for path, tensors in adapter.layers.items():
        fresh = m.initialize(base.get_submodule(path).weight, adapter.config, path)
        for name in m.basis:
            assert torch.equal(tensors[name], fresh[name]), f"{path}.{name} moved"
        moved += sum(not torch.equal(tensors[n], fresh[n]) for n in m.trainable)
        dw = m.delta_weight(tensors, adapter.config.scale)  # (out, in)
        frozen_input = m.lora_factors(tensors, 1.0)[1]  # A (r, in): the frozen input directions
        inside = dw @ torch.linalg.pinv(frozen_input) @ frozen_input
        assert torch.allclose(inside, dw, atol=1e-5 * max(float(dw.abs().max()), 1e-12)), path
        if method == "triu_qr_input_frozen":  # dR (r x out) keeps R's upper triangle
            assert torch.count_nonzero(torch.tril(tensors["delta_r"], diagonal=-1)) == 0
    assert moved, "no trainable tensor changed"
    if method == "ortho_adapt":
        assert (adapter.config.basis, adapter.config.basis_offset) == ("random", 4)  # recorded in the file


def test_input_frozen_qr_is_the_transpose_of_qr_lora():
    """qr_input_frozen's frozen product is the top-r core (so ``W - s R^T Q^T`` is QR-LoRA's residual), its Q spans
    the top right singular vectors, and its trainable side has out x r entries (deltaR's count on a square layer)."""
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    m, cfg = METHODS["qr_input_frozen"], AdapterConfig(method="qr_input_frozen", rank=4, alpha=8.0)
    t = m.initialize(w, cfg, "blk.lin")
    torch.testing.assert_close(cfg.scale * m.basis_product(t), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t["q"].T @ t["q"], torch.eye(4), atol=1e-5, rtol=0)
    assert subspace_overlap(t["q"], vh[:4].T) == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(torch.tril(t["base_r"], diagonal=-1)) == 0  # R upper-triangular, as QR-LoRA's
    assert m.trainable_count(24, 16, cfg) == 24 * 4
    t["delta_r"] = torch.randn_like(t["delta_r"])
    x = torch.randn(5, 16)
    torch.testing.assert_close(m.output(t, x, cfg.scale), x @ m.delta_weight(t, cfg.scale).T, atol=1e-5, rtol=1e-5)
    shifted = m.initialize(w, cfg.with_(basis_offset=4), "blk.lin")["q"]
    assert subspace_overlap(shifted, vh[4:8].T) == pytest.approx(1.0, abs=1e-4)


def test_ortho_adapt_bases_are_disjoint_by_offset_shared_by_seed_and_gaussian_on_request():
    w = torch.randn(24, 16)
    m = METHODS["ortho_adapt"]

    def basis(**fields):
        return m.initialize(w, AdapterConfig(method="ortho_adapt", rank=4, **fields), "blk.lin")["lora_A"]  # (r, in)

    first, second = basis(), basis(basis_offset=4)
    torch.testing.assert_close(first @ first.T, torch.eye(4), atol=1e-5, rtol=0)
    assert float((first @ second.T).abs().max()) < 1e-5  # columns of one orthogonal matrix
    assert torch.equal(first, basis())  # one seed and offset: one basis (the shared control)
    assert not torch.equal(first, basis(basis_seed=1))
    gaussian = basis(basis="gaussian")
    assert gaussian.pow(2).sum(1).mean() == pytest.approx(1.0, abs=0.5)  # N(0, 1/in): unit rows in expectation
    assert m.initialize(w, AdapterConfig(method="ortho_adapt", rank=4), "l")["lora_B"].abs().sum() == 0  # identity
    with pytest.raises(UserError, match="--qr_basis top: ortho_adapt draws its frozen basis as random or gaussian"):
        AdapterConfig(method="ortho_adapt", basis="top")
    with pytest.raises(UserError, match="exceeds the 16 orthogonal input directions of layer blk.lin"):
        m.initialize(w, AdapterConfig(method="ortho_adapt", rank=4, basis_offset=13), "blk.lin")


def test_a_basis_flag_the_method_cannot_use_is_one_error_line(tiny_sd3, tmp_path):
    proc = run_script([sys.executable, "-m", "qrlora.train", "--pretrained_model_name_or_path", str(tiny_sd3),
                       "--instance_data_dir", str(REPO / "assets/cnt/cat"), "--instance_prompt", "a <c> cat",
                       "--output_dir", str(tmp_path / "run"), "--lora_init_method", "qr_input_frozen",
                       "--qr_basis", "random"], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--qr_basis random: qr_input_frozen draws its frozen basis as top" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_quick_study_runs_the_frozen_side_conditions(tmp_path):
    """``study --quick`` runs the conditions it names at its own settings, recorded so they never mix with a full
    study's; the full-study flags on that folder are refused."""
    out = tmp_path / "quick"
    run_script([sys.executable, "-m", "qrlora.world", "study", "--quick", "--conditions", "qr_input_frozen,ortho_adapt",
                "--output", str(out), "--jobs", "1"])
    report = json.loads((out / "world_study.json").read_text())
    assert [r["name"] for r in report["conditions"]] == ["qr_input_frozen", "ortho_adapt"]
    assert report["settings"]["steps_override"] == 30 and report["settings"]["grid"] == [1.0]
    assert all(r["seeds"] == [0] and r["both_at_1_1"]["samples"] == 4 for r in report["conditions"])
    assert all(r["mechanism"]["row_overlap"] is not None for r in report["conditions"])
    proc = run_script([sys.executable, "-m", "qrlora.world", "study", "--conditions", "qr_input_frozen",
                       "--output", str(out), "--samples", "4", "--jobs", "1"], check=False)
    assert proc.returncode != 0 and "holds a study with other settings" in proc.stderr


@pytest.mark.slow
def test_study_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    run_script([sys.executable, "-m", "bench.study_throughput", "--smoke", "--output", str(out)])
    payload = json.loads(out.read_text())
    assert set(payload["best_seconds"]) == {"triu_deltaR", "qr_input_frozen"}
    assert payload["over_baseline"]["qr_input_frozen"] > 0 and payload["baseline"] == {"qr_input_frozen": "triu_deltaR"}


def test_docs_frozen_side_tables_are_the_committed_reports():
    from qrlora.toy.world.study import FROZEN_SIDE_END, FROZEN_SIDE_START, frozen_side_block

    page = (REPO / "docs/world.md").read_text()
    assert page.count(FROZEN_SIDE_START) == 1 and page.count(FROZEN_SIDE_END) == 1
    block = FROZEN_SIDE_START + page.split(FROZEN_SIDE_START, 1)[1].split(FROZEN_SIDE_END, 1)[0] + FROZEN_SIDE_END
    assert block == frozen_side_block(REPO / "bench/reports"), \
        "docs/world.md frozen-side tables differ from bench/reports/world_study*.json: python -m bench.readme_table --write"


def test_every_method_says_which_side_it_freezes():
    """``Method.frozen_side`` matches the math: a zero-initialised adapter's frozen tensors fix its row space
    (input side) or its column space (output side) of every dW it can reach."""
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(2))
    for name, m in METHODS.items():
        if not m.static:
            continue
        cfg = AdapterConfig(method=name, rank=4)
        t = m.initialize(w, cfg, "blk.lin")
        reached = []
        for k in range(2):  # two random settings of the trainable side
            moved = dict(t)
            for n in m.trainable:
                moved[n] = t[n] + torch.randn(t[n].shape, generator=torch.Generator().manual_seed(k))
            reached.append(m.delta_weight(moved, cfg.scale))
        u = [torch.linalg.svd(d)[0][:, :4] for d in reached]
        v = [torch.linalg.svd(d)[2][:4].T for d in reached]
        same_output, same_input = subspace_overlap(*u) > 0.999, subspace_overlap(*v) > 0.999
        expected = {"output": (True, False), "input": (False, True), "neither": (False, False)}[m.frozen_side]
        assert (same_output, same_input) == expected, name


# ---- the sequential control: --base_adapter -----------------------------------------------------------------------
def test_base_adapter_trains_on_top_of_a_frozen_adapter_and_saves_only_its_own(tiny_sd3, tmp_path):
    """The style run sees the content adapter (its training differs from the same run without it), saves only its own
    tensors, records the base adapter, and leaves the base adapter's file as it was."""
    from qrlora.files.checkpoint import load_adapter, read_safetensors

    content_path = _train(tiny_sd3, tmp_path / "content", "lora")
    before = read_safetensors(content_path)
    on_top = load_adapter(_train(tiny_sd3, tmp_path / "on_top", "triu_deltaR", "--base_adapter", str(content_path)))
    alone = load_adapter(_train(tiny_sd3, tmp_path / "alone", "triu_deltaR"))
    assert on_top.config.method == "triu_deltaR" and set(on_top.layers) == set(alone.layers)
    assert on_top.metadata["base_adapter"] == str(content_path) and "base_adapter" not in alone.metadata
    layer = sorted(alone.layers)[0]
    assert not torch.equal(on_top.layers[layer]["delta_r"], alone.layers[layer]["delta_r"])  # it saw the base adapter
    assert torch.equal(on_top.layers[layer]["q"], alone.layers[layer]["q"])  # its basis is still the base model's own
    after = read_safetensors(content_path)
    assert before[1] == after[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_a_base_adapter_of_another_model_is_one_line_and_leaves_no_folder(tiny_sd3, tiny_flux, tmp_path):
    flux_adapter = _train(tiny_flux, tmp_path / "flux", "lora", steps=1)
    for bad, says in ((flux_adapter, "--base_adapter"), (tmp_path / "missing.safetensors", "missing.safetensors")):
        proc = run_script([sys.executable, "-m", "qrlora.train", "--pretrained_model_name_or_path", str(tiny_sd3),
                           "--instance_data_dir", str(REPO / "assets/cnt/cat"), "--instance_prompt", "a <c> cat",
                           "--resolution", "64", "--max_train_steps", "1", "--output_dir", str(tmp_path / "run"),
                           "--base_adapter", str(bad)], check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and says in proc.stderr, proc.stderr[-800:]
        assert not (tmp_path / "run").exists()
