"""Hostile input (issue 30): every case of the sweep that was not clean, and the class each stands for.

Each case gives one line naming the file, flag or layer at fault and a non-zero exit (or recomputes what it can),
never a traceback, a silent wrong result, a hang or lost data. The fast cases run in the quick subset."""
from __future__ import annotations

import pytest
import torch

from conftest import error_lines, load_denoiser, make_adapter, one_error
from qrlora.cli.merge import merge_main
from qrlora.files.checkpoint import load_adapter

RENDER = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def sd3_pair(tiny_sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_pair")
    return (make_adapter(tiny_sd3, "sd3", root / "a.safetensors", seed=1),
            make_adapter(tiny_sd3, "sd3", root / "b.safetensors", method="lora", seed=2))


# ---- 1. a saved TIES / DARE merge is the strategy's merge, not the plain sum ---------------------------------
@pytest.mark.parametrize("strategy", ["ties", "dare"])
def test_saved_ties_dare_merge_is_the_strategys_merge(strategy, tiny_sd3, sd3_pair, tmp_path):
    import diffusers
    from peft.utils.merge_utils import dare_linear, ties

    from qrlora.core.decompose import layer_seed

    merge_main(["--model_path", str(tiny_sd3), "--adapters", *map(str, sd3_pair), "--weights", "1,0.5",
                "--merge_strategy", strategy, "--merge_density", "0.1", "--save_merged", str(tmp_path / "m"),
                "--no_render", "--device", "cpu"])
    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "m")
    base = load_denoiser(tiny_sd3, "sd3")
    dWs = [load_adapter(a).delta_weights() for a in sd3_pair]
    weights = torch.tensor([1.0, 0.5])
    checked = 0
    for p in dWs[0]:
        if p not in dWs[1]:
            continue
        deltas = [dWs[0][p], dWs[1][p]]
        if strategy == "ties":
            expected = ties(deltas, weights, 0.1, majority_sign_method="total")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(layer_seed(0, p))
                expected = dare_linear(deltas, weights, 0.1)
        got = merged.get_submodule(p).weight - base.get_submodule(p).weight
        plain = deltas[0] + 0.5 * deltas[1]
        assert torch.allclose(got, expected, atol=1e-5), p
        assert not torch.allclose(got, plain, atol=1e-3), p  # the bug: the saved file was the plain sum
        checked += 1
    assert checked


@pytest.mark.parametrize("strategy", ["ties", "dare"])
@pytest.mark.parametrize("save", [False, True])
def test_moe_adapter_with_ties_or_dare_is_refused_on_render_and_save(strategy, save, tiny_sd3, sd3_pair, tmp_path,
                                                                      capsys):
    moe = make_adapter(tiny_sd3, "sd3", tmp_path / "moe.safetensors", method="moe", rank=4, num_experts=2)
    flags = ["--model_path", str(tiny_sd3), "--adapters", str(sd3_pair[0]), str(moe), "--merge_strategy", strategy,
             *RENDER, "--output_dir", str(tmp_path / "out")]
    if save:
        flags += ["--save_merged", str(tmp_path / "m"), "--no_render"]
    line = one_error(capsys, lambda: merge_main(flags))
    assert "moe.safetensors" in line and f"--merge_strategy {strategy}" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
