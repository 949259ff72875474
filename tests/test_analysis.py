"""qrlora.evaluation.analysis and the test/ analysis scripts: metrics on hand-computed cases, layer order, end-to-end runs
on adapters built from the tiny SD3 pipeline, figures that decode, JSON that matches a direct recomputation,
and one-line errors for bad input."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from qrlora.evaluation import analysis
from qrlora.files.checkpoint import adapter_from_model, adapter_metadata, load_adapter, save_adapter
from qrlora.core.inject import inject_adapters, trainable_parameters
from qrlora.core.methods import AdapterConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def _script(name: str):
    """Import test/<name>.py as a module, so its ``main(argv)`` runs in-process (fast)."""
    spec = importlib.util.spec_from_file_location(f"_analysis_script_{name}", REPO / "test" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strict_json(path: pathlib.Path):
    """Parse JSON, failing on NaN / Infinity (Python's json accepts them by default)."""
    def reject(token):
        raise AssertionError(f"{path} holds {token}")

    return json.loads(pathlib.Path(path).read_text(), parse_constant=reject)


def _assert_png(path: pathlib.Path, min_side: int = 200):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        assert min(im.size) >= min_side, (path, im.size)
        assert np.asarray(im.convert("L")).std() > 1.0  # not a blank canvas


# ---------------------------------------------------------------------------------------------------------
# Metrics against hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_cosine_hand_cases():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert analysis.cosine_similarity(x, x) == pytest.approx(1.0)
    assert analysis.cosine_similarity(x, -2 * x) == pytest.approx(-1.0)
    assert analysis.cosine_similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])) == 0.0
    # [1, 1] vs [1, 0]: cos 45 degrees
    assert analysis.cosine_similarity(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1 / math.sqrt(2))
    zero = torch.zeros(2, 2)
    assert analysis.cosine_similarity(zero, zero) is None  # a zero matrix has no direction: undefined
    assert analysis.cosine_similarity(zero, x) is None and analysis.cosine_similarity(x, zero) is None


def test_summarize_leaves_undefined_layers_out_and_counts_them():
    stats = analysis.summarize([0.2, None, -0.4, None])
    assert stats["n_layers"] == 2 and stats["n_left_out"] == 2
    assert stats["mean"] == pytest.approx(-0.1) and stats["abs_mean"] == pytest.approx(0.3)
    assert analysis.summarize([None])["n_layers"] == 0  # nothing defined: empty statistics, still no NaN


def test_a_dead_layer_does_not_inflate_the_mean_cosine(adapters, tmp_path, capsys):
    """One layer whose dR is zero in both files (never trained) is left out of every cosine statistic."""
    from qrlora.files.checkpoint import load_adapter, save_adapter

    paths = []
    for key in ("qr_sty", "qr_cnt"):
        adapter = load_adapter(adapters[key])
        dead = analysis.order_layers(adapter.layers)[0]
        adapter.layers[dead]["delta_r"] = torch.zeros_like(adapter.layers[dead]["delta_r"])
        paths.append(save_adapter(tmp_path / f"{key}_dead.safetensors", adapter))
    live = analysis.run_similarity(adapters["qr_sty"], adapters["qr_cnt"], tmp_path / "live", bins=8,
                                   progress=False, figures=False, matrices=["dR"])
    summary = analysis.run_similarity(*paths, tmp_path / "dead", bins=8, progress=False, figures=True,
                                      matrices=["dR"])
    data = _strict_json(tmp_path / "dead" / "dR_cosine_data.json")
    assert data[dead] is None and sum(v is None for v in data.values()) == 1
    stats = summary["dR"]["cosine"]
    assert stats["n_left_out"] == 1 and stats["n_layers"] == live["dR"]["cosine"]["n_layers"] - 1
    others = [v for layer, v in _strict_json(tmp_path / "live" / "dR_cosine_data.json").items() if layer != dead]
    assert stats["abs_mean"] == pytest.approx(sum(abs(v) for v in others) / len(others))
    assert "1 layer(s) with an all-zero matrix left out" in capsys.readouterr().out


def test_linear_cka_hand_cases():
    # One feature: CKA is the squared Pearson correlation. x = [1, 2, 3], y = [1, 0, 0]:
    # centred x = [-1, 0, 1], y = [2/3, -1/3, -1/3]; (y.x)^2 = 1, |x|^2 = 2, |y|^2 = 2/3 -> 1 / (4/3) = 0.75.
    assert analysis.linear_cka(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    assert analysis.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    assert analysis.linear_cka(x, 3.0 * x @ q + 7.0) == pytest.approx(1.0)  # orthogonal map, scale, shift
    # Orthogonal (centred) sample patterns give 0.
    a = torch.tensor([[1.0], [-1.0], [0.0], [0.0]])
    b = torch.tensor([[0.0], [0.0], [1.0], [-1.0]])
    assert analysis.linear_cka(a, b) == pytest.approx(0.0, abs=1e-12)
    assert analysis.linear_cka(torch.zeros(5, 3), torch.zeros(5, 3)) == 1.0
    assert analysis.linear_cka(torch.zeros(5, 3), x[:5, :3]) == 0.0
    assert analysis.linear_cka(torch.full((5, 3), 2.0), x[:5, :3]) == 0.0  # constant columns centre to zero


def test_linear_cka_forms_agree():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 30, generator=gen), torch.randn(6, 30, generator=gen)
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert analysis.linear_cka(x, y) == pytest.approx(feature.item(), rel=1e-9)  # computed in the n x n form


def test_linear_cka_factored_matches_dense():
    gen = torch.Generator().manual_seed(2)
    for kx, ky in ((4, 4), (8, 4), (1, 3)):
        lx, rx = torch.randn(48, kx, generator=gen).double(), torch.randn(kx, 40, generator=gen).double()
        ly, ry = torch.randn(48, ky, generator=gen).double(), torch.randn(ky, 40, generator=gen).double()
        assert analysis.linear_cka_factored(lx, rx, ly, ry) == pytest.approx(analysis.linear_cka(lx @ rx, ly @ ry), rel=1e-9)
        assert analysis.linear_cka_factored(lx, rx, lx, rx) == pytest.approx(1.0)
    z = torch.zeros(4, 40)
    assert analysis.linear_cka_factored(lx, z[:kx], lx, z[:kx]) == 1.0
    assert analysis.linear_cka_factored(lx, z[:kx], ly, ry) == 0.0


def test_nmi_hand_cases():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert analysis.normalized_mutual_information(x, x, bins=2) == pytest.approx(1.0)
    assert analysis.normalized_mutual_information(x, y, bins=2) == pytest.approx(0.0, abs=1e-12)  # independent
    assert analysis.normalized_mutual_information(x, 1 - x, bins=2) == pytest.approx(1.0)  # a bijection of x
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(200_000, generator=gen), torch.randn(200_000, generator=gen)
    assert analysis.normalized_mutual_information(a, a, bins=16) == pytest.approx(1.0)
    assert analysis.normalized_mutual_information(a, b, bins=16) < 0.01
    assert 0.1 < analysis.normalized_mutual_information(a, a + b, bins=16) < 0.9
    assert analysis.normalized_mutual_information(torch.zeros(10), torch.zeros(10)) == 0.0  # documented rule
    assert analysis.normalized_mutual_information(torch.ones(10), torch.arange(10.0)) == 0.0


def test_matrix_similarity_orientation():
    t = torch.arange(12.0).reshape(3, 4)  # r x in: samples = input dimension
    assert analysis.cka_view(t).shape == (4, 3)
    assert analysis.cka_view(t.T).shape == (4, 3)  # tall factor kept
    assert analysis.cka_view(torch.ones(5, 5), is_delta_weight=True).shape == (5, 5)
    assert analysis.cka_view(torch.ones(6, 5), is_delta_weight=True).shape == (5, 6)  # dW^T


# ---------------------------------------------------------------------------------------------------------
# Layer order by block depth
# ---------------------------------------------------------------------------------------------------------
def test_layer_order_and_blocks():
    flux = [
        "context_embedder", "x_embedder", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.2.attn.to_q", "transformer_blocks.10.attn.to_q",
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.9.attn.to_q", "single_transformer_blocks.11.attn.to_q", "proj_out",
    ]
    sdxl = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_out.0",
    ]
    for expected in (flux, sdxl):
        shuffled = expected[:]
        random.Random(0).shuffle(shuffled)
        assert analysis.order_layers(shuffled) == expected
    assert analysis.block_of("transformer_blocks.3.attn.to_q") == analysis.BlockInfo("joint", "J3", "attn.to_q")
    assert analysis.block_of("transformer_blocks.3.ff.net.0.proj").label == "J3"
    assert analysis.block_of("single_transformer_blocks.5.proj_mlp") == analysis.BlockInfo("single", "S5", "proj_mlp")
    info = analysis.block_of("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert (info.kind, info.label, info.leaf) == ("down", "D1.0.0", "attn1.to_q")
    assert analysis.block_of("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").label == "M0.0"
    assert analysis.block_of("proj_out").kind == "other"


# ---------------------------------------------------------------------------------------------------------
# Adapters built on the tiny SD3 pipeline (conftest's session fixture), "trained" by seeded noise on the
# trainable tensors; one test below uses the real trainer.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_sd3, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    base = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer")
    root = tmp_path_factory.mktemp("adapters")

    def make(name, method, seed, *, rank=4, targets=TARGETS, train=True):
        model = copy.deepcopy(base)
        cfg = AdapterConfig(method=method, rank=rank, num_experts=2)
        inject_adapters(model, cfg, targets)
        if train:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in trainable_parameters(model):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        meta = adapter_metadata(cfg, component="transformer", backbone="sd3", base_model=str(tiny_sd3), targets=targets)
        path = root / name / "pytorch_lora_weights.safetensors"
        save_adapter(path, adapter_from_model(model, cfg, meta))
        return path

    paths = {
        "qr_sty": make("qr_sty", "deltaR", 1), "qr_cnt": make("qr_cnt", "deltaR", 2),
        "lora_sty": make("lora_sty", "lora", 1), "lora_cnt": make("lora_cnt", "lora", 2),
        "ica_sty": make("ica_sty", "ica", 1), "ica_cnt": make("ica_cnt", "ica", 2),
        "moe_sty": make("moe_sty", "moe", 1), "moe_cnt": make("moe_cnt", "moe", 2),
        "zero1": make("zero1", "deltaR", 0, train=False), "zero2": make("zero2", "deltaR", 0, train=False),
        "other_layers": make("other_layers", "deltaR", 3, targets=["attn.add_q_proj"]),
        "rank2": make("rank2", "deltaR", 4, rank=2),
    }
    (root / "notes.txt").write_text("not an adapter\n")
    paths["text"] = root / "notes.txt"
    from safetensors.torch import save_file

    save_file({"transformer_blocks.0.norm1.linear.weight": torch.ones(2, 2)}, str(root / "model.safetensors"))
    paths["foreign"] = root / "model.safetensors"
    return paths


def _recompute(a1, a2, layer, matrix, bins):
    """Direct recomputation of one JSON value from the files, with the dense metric functions."""
    names = {"Q": "q", "R": "base_r", "dR": "delta_r", "A": "q", "S0": "base_r", "dS": "delta_r"}
    if matrix == "dW":
        x = a1.method.delta_weight(a1.layers[layer], a1.config.scale)
        y = a2.method.delta_weight(a2.layers[layer], a2.config.scale)
        xv, yv = x.T, y.T
    else:
        x, y = a1.layers[layer][names[matrix]], a2.layers[layer][names[matrix]]
        xv, yv = (x.T, y.T) if x.shape[0] < x.shape[1] else (x, y)
    return {"cosine": torch.nn.functional.cosine_similarity(x.reshape(-1).double(), y.reshape(-1).double(), dim=0).item(),
            "cka": analysis.linear_cka(xv, yv), "nmi": analysis.normalized_mutual_information(x, y, bins)}


def test_similarity_end_to_end(adapters, tmp_path, capsys):
    out = tmp_path / "sim"
    _script("visualize_qrlora_similarity").main([
        "--lora1_path", str(adapters["qr_sty"]), "--lora2_path", str(adapters["qr_cnt"]),
        "--lora1_name", "sty", "--lora2_name", "cnt", "--output_dir", str(out), "--fixed_scale", "--bins", "16",
        "--device", "cpu", "--dpi", "80",
    ])
    printed = capsys.readouterr().out
    assert "dR" in printed and "cosine" in printed
    summary = _strict_json(out / "all_statistics_summary.json")
    assert list(summary) == ["Q", "R", "dR", "dW"]
    info = _strict_json(out / "analysis_info.json")
    layers = info["layers"]
    assert layers == analysis.order_layers(layers) and len(layers) == 8  # 2 joint blocks x 4 targets
    assert layers[0] == "transformer_blocks.0.attn.to_q" and set(info["block_kinds"]) == {"joint"}
    a1, a2 = load_adapter(adapters["qr_sty"]), load_adapter(adapters["qr_cnt"])
    for matrix in summary:
        for metric in analysis.METRICS:
            data = _strict_json(out / f"{matrix}_{metric}_data.json")
            assert list(data) == layers
            for layer, value in data.items():
                assert value == pytest.approx(_recompute(a1, a2, layer, matrix, 16)[metric], abs=1e-6), (matrix, metric, layer)
            stats = summary[matrix][metric]
            assert stats["mean"] == pytest.approx(np.mean(list(data.values())))
            assert stats["std"] == pytest.approx(np.std(list(data.values())))
            assert stats["min"] == min(data.values()) and stats["max"] == max(data.values())
            _assert_png(out / f"{matrix}_{metric}_fixed_line.png")
            _assert_png(out / f"{matrix}_{metric}_fixed_hist.png")
    _assert_png(out / "overview_fixed.png")
    # Same frozen basis: Q and R are shared exactly; the trained dR are not alike.
    for matrix in ("Q", "R"):
        assert summary[matrix]["cosine"]["min"] == pytest.approx(1.0)
        assert summary[matrix]["cka"]["min"] == pytest.approx(1.0)
        assert summary[matrix]["nmi"]["min"] == pytest.approx(1.0)
    assert summary["dR"]["cosine"]["abs_mean"] < 0.5


def test_zero_init_pair_gives_defined_values(adapters, tmp_path):
    out = tmp_path / "zero"
    analysis.run_similarity(adapters["zero1"], adapters["zero2"], out, bins=8, progress=False, figures=False)
    summary = _strict_json(out / "all_statistics_summary.json")
    for matrix in ("dR", "dW"):
        cos = summary[matrix]["cosine"]  # both zero: no direction, every layer left out (counted, no NaN)
        assert cos["n_layers"] == 0 and cos["n_left_out"] > 0 and cos["mean"] == 0.0
        assert summary[matrix]["cka"]["mean"] == 1.0
        assert summary[matrix]["nmi"]["mean"] == 0.0  # constant input: no information
    # One zero, one trained: cosine undefined (left out), CKA 0 by its rule.
    out2 = tmp_path / "zero_vs_trained"
    analysis.run_similarity(adapters["zero1"], adapters["qr_sty"], out2, bins=8, progress=False, figures=False,
                            matrices=["dR"])
    summary = _strict_json(out2 / "all_statistics_summary.json")
    assert list(summary) == ["dR"]
    assert summary["dR"]["cosine"]["n_layers"] == 0 and summary["dR"]["cka"]["max"] == 0.0


def test_compare_mode(adapters, tmp_path, capsys):
    out = tmp_path / "compare"
    _script("visualize_qrlora_similarity").main([
        "--compare", "--lora1_path", str(adapters["qr_sty"]), "--lora2_path", str(adapters["qr_cnt"]),
        "--baseline1_path", str(adapters["lora_sty"]), "--baseline2_path", str(adapters["lora_cnt"]),
        "--output_dir", str(out), "--device", "cpu",
    ])
    printed = capsys.readouterr().out
    assert "QR-LoRA (deltaR)" in printed and "LoRA" in printed and "ratio" in printed
    data = _strict_json(out / "dW_comparison.json")
    assert [p["label"] for p in data["pairs"]] == ["QR-LoRA (deltaR)", "LoRA"]
    assert set(data["summary_table"]) == set(analysis.METRICS)
    _assert_png(out / "dW_comparison_auto.png", min_side=500)
    lo1, lo2 = load_adapter(adapters["lora_sty"]), load_adapter(adapters["lora_cnt"])
    pair = data["pairs"][1]
    for layer in pair["layers"]:
        direct = _recompute(lo1, lo2, layer, "dW", analysis.DEFAULT_BINS)
        for metric in analysis.METRICS:
            assert pair["per_layer"][metric][layer] == pytest.approx(direct[metric], abs=1e-6)
    assert data["summary_table"]["cosine"]["LoRA"]["mean"] == pytest.approx(np.mean(list(pair["per_layer"]["cosine"].values())))


def test_compare_on_adapters_from_the_trainer(tiny_sd3, tmp_path, capsys):
    """The paper's workflow end to end: a style and a content adapter trained with QR-LoRA and with
    --lora_init_method lora in the same trainer, then the --compare figure and table."""
    train = pytest.importorskip("qrlora.cli.train")
    tasks = {"sty": ("assets/sty/swirl_painting", "a painting in <s> style"), "cnt": ("assets/cnt/cat", "a photo of a <c> cat")}
    files = {}
    for method in ("deltaR", "lora"):
        for task, (data, prompt) in tasks.items():
            files[method, task] = train.main([
                "--pretrained_model_name_or_path", str(tiny_sd3), "--instance_data_dir", str(REPO / data),
                "--instance_prompt", prompt, "--resolution", "64", "--max_train_steps", "2", "--learning_rate", "1e-2",
                "--rank", "4", "--lora_init_method", method, "--output_dir", str(tmp_path / f"{method}_{task}")])
    out = tmp_path / "compare"
    _script("visualize_qrlora_similarity").main([
        "--compare", "--lora1_path", str(files["deltaR", "sty"]), "--lora2_path", str(files["deltaR", "cnt"]),
        "--baseline1_path", str(files["lora", "sty"]), "--baseline2_path", str(files["lora", "cnt"]),
        "--output_dir", str(out), "--device", "cpu", "--bins", "16", "--dpi", "80"])
    assert "ratio of |mean|" in capsys.readouterr().out
    data = _strict_json(out / "dW_comparison.json")
    assert [p["label"] for p in data["pairs"]] == ["QR-LoRA (deltaR)", "LoRA"]
    _assert_png(out / "dW_comparison_auto.png")
    # Trained from the same frozen basis: Q and R are identical in both files; dR is what differs.
    summary = analysis.run_similarity(files["deltaR", "sty"], files["deltaR", "cnt"], tmp_path / "sim", bins=16,
                                      progress=False, figures=False)
    assert summary["Q"]["cosine"]["min"] == pytest.approx(1.0) and summary["R"]["cka"]["min"] == pytest.approx(1.0)
    # (A layer whose dR never received a gradient stays zero in both files: its cosine is left out.)
    assert summary["dR"]["cosine"]["min"] < 0.999


def test_ica_script(adapters, tmp_path, capsys):
    module = _script("analyze_sd3_ica_similarity")
    out = tmp_path / "ica"
    module.main(["--lora1_path", str(adapters["ica_cnt"]), "--lora2_path", str(adapters["ica_sty"]),
                 "--output_dir", str(out), "--device", "cpu", "--metrics", "cka", "cosine"])
    summary = _strict_json(out / "all_statistics_summary.json")
    assert list(summary) == ["A", "S0", "dS", "dW"]
    assert all(list(per_metric) == ["cosine", "cka"] for per_metric in summary.values())
    assert summary["A"]["cosine"]["min"] == pytest.approx(1.0) and summary["S0"]["cosine"]["min"] == pytest.approx(1.0)
    a1, a2 = load_adapter(adapters["ica_cnt"]), load_adapter(adapters["ica_sty"])
    data = _strict_json(out / "dS_cka_data.json")
    for layer, value in data.items():
        assert value == pytest.approx(_recompute(a1, a2, layer, "dS", 64)["cka"], abs=1e-6)
    _assert_png(out / "dS_cosine_auto_line.png")
    _assert_png(out / "overview_auto.png")
    assert not (out / "dS_nmi_data.json").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        module.main(["--lora1_path", str(adapters["qr_sty"]), "--lora2_path", str(adapters["qr_cnt"]),
                     "--output_dir", str(tmp_path / "no")])
    assert exc.value.code == 2
    assert "ica" in capsys.readouterr().err


@pytest.mark.parametrize("case, needle", [
    ("no_common", "no layer in common"),
    ("ranks", "rank 2 differs"),
    ("text", "not a readable safetensors"),
    ("foreign", "not an adapter tensor"),
    ("missing", "no such file"),
    ("compare_no_baseline", "--baseline1_path"),
    ("bins", "--bins"),
    ("metrics", "--metrics"),
    ("matrices", "--matrices: dS"),
])
def test_bad_input_one_line(adapters, tmp_path, capsys, case, needle):
    p1, p2 = str(adapters["qr_sty"]), str(adapters["qr_cnt"])
    extra = []
    if case == "no_common":
        p2 = str(adapters["other_layers"])
    elif case == "ranks":
        p2 = str(adapters["rank2"])
    elif case in ("text", "foreign"):
        p2 = str(adapters[case])
    elif case == "missing":
        p2 = str(tmp_path / "nope.safetensors")
    elif case == "compare_no_baseline":
        extra = ["--compare"]
    elif case == "bins":
        extra = ["--bins", "1"]
    elif case == "metrics":
        extra = ["--metrics", "pearson"]
    elif case == "matrices":
        extra = ["--matrices", "dR", "dS"]
    with pytest.raises(SystemExit) as exc:
        _script("visualize_qrlora_similarity").main(
            ["--lora1_path", p1, "--lora2_path", p2, "--output_dir", str(tmp_path / "o"), "--device", "cpu", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_shell_wrapper(adapters, tmp_path):
    """The wrapper sets the device, finds the repo from its own path, and passes extra flags through; a bad
    flag value (--bins 1, caught before any work) comes back as one error line and exit status 2."""
    out = tmp_path / "wrapped"
    env = {**os.environ, "LORA1_PATH": str(adapters["qr_sty"]), "LORA2_PATH": str(adapters["qr_cnt"]),
           "OUTPUT_DIR": str(out), "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(REPO / "test" / "visualize_qrlora_similarity.sh"), "cpu", "--bins", "1"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "error: --bins: must be at least 2, got 1"
    assert "Traceback" not in run.stderr
    assert (out / "vis_script.sh").is_file() and f"OUTPUT_DIR: {out}" in run.stdout
    usage = subprocess.run(["bash", str(REPO / "test" / "visualize_qrlora_similarity.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


# ---------------------------------------------------------------------------------------------------------
# MoE expert usage
# ---------------------------------------------------------------------------------------------------------
def test_moe_expert_usage_and_comparison(adapters, tiny_sd3, tmp_path, capsys):
    module = _script("analyze_moe_experts")
    outs = {}
    for name in ("moe_sty", "moe_cnt"):
        outs[name] = tmp_path / name
        module.main(["--model_path", str(tiny_sd3), "--lora_path", str(adapters[name]), "--prompt", "a photo of sks dog",
                     "--prompt", "a painting in the style of monet", "--num_inference_steps", "3", "--num_experts", "2",
                     "--output_dir", str(outs[name]), "--device", "cpu"])
    assert "expert 0" in capsys.readouterr().out
    usage = _strict_json(outs["moe_sty"] / "expert_usage.json")
    layers = usage["layers"]
    assert layers == analysis.order_layers(load_adapter(adapters["moe_sty"]).layers) and len(layers) == 8
    assert usage["num_experts"] == 2 and len(usage["prompts"]) == 2
    assert len(usage["per_step"]) == 3
    for layer in layers:
        steps = np.asarray(usage["per_layer_per_step"][layer])
        assert steps.shape == (3, 2)
        np.testing.assert_allclose(steps.sum(1), 1.0, atol=1e-6)  # softmax gates
        np.testing.assert_allclose(usage["usage"][layer], steps.mean(0), atol=1e-9)
    np.testing.assert_allclose(usage["per_step"], np.mean([usage["per_layer_per_step"][l] for l in layers], axis=0))
    _assert_png(outs["moe_sty"] / "expert_heatmap.png")
    _assert_png(outs["moe_sty"] / "expert_usage_per_step.png")

    cmp_out = tmp_path / "usage_cmp"
    _script("compare_expert_usage").main(["--content_usage", str(outs["moe_cnt"] / "expert_usage.json"),
                                          "--style_usage", str(outs["moe_sty"]), "--output_dir", str(cmp_out)])
    assert "global cosine" in capsys.readouterr().out
    result = _strict_json(cmp_out / "usage_comparison.json")
    content = _strict_json(outs["moe_cnt"] / "expert_usage.json")
    for layer in layers:
        np.testing.assert_allclose(result["per_layer"][layer]["diff"],
                                   np.subtract(content["usage"][layer], usage["usage"][layer]), atol=1e-12)
    c = np.asarray([content["usage"][l] for l in layers]).ravel()
    s = np.asarray([usage["usage"][l] for l in layers]).ravel()
    assert result["global_cosine"] == pytest.approx(c @ s / np.linalg.norm(c) / np.linalg.norm(s))
    _assert_png(cmp_out / "usage_difference.png")


@pytest.mark.parametrize("case, needle", [
    ("not_moe", "moe adapter"),
    ("experts", "--num_experts 4"),
    ("model", "--model_path"),
])
def test_moe_bad_input(adapters, tiny_sd3, tmp_path, capsys, case, needle):
    lora = adapters["qr_sty"] if case == "not_moe" else adapters["moe_sty"]
    model = tmp_path / "no_model" if case == "model" else tiny_sd3
    extra = ["--num_experts", "4"] if case == "experts" else []
    with pytest.raises(SystemExit) as exc:
        _script("analyze_moe_experts").main(["--model_path", str(model), "--lora_path", str(lora),
                                             "--output_dir", str(tmp_path / "o"), "--device", "cpu", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_compare_usage_bad_input(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"usage": {"x.to_q": [0.5, 0.5]}, "num_experts": 2}))
    (tmp_path / "b.json").write_text(json.dumps({"usage": {"y.to_q": [0.5, 0.5]}, "num_experts": 2}))
    (tmp_path / "c.json").write_text("[1, 2]")
    for other, needle in (("b.json", "no layer in common"), ("c.json", "not an expert_usage.json")):
        with pytest.raises(SystemExit) as exc:
            _script("compare_expert_usage").main(["--content_usage", str(tmp_path / "a.json"),
                                                  "--style_usage", str(tmp_path / other), "--output_dir", str(tmp_path / "o")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, err
