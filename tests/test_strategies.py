"""Merge strategies: direct (bit-identical to the plain Merger), K-LoRA (exact at its definition), ZipLoRA (learns, writes
a normal adapter file), and their refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import error_lines, make_adapter
from qrlora.files.checkpoint import load_adapter
from qrlora.files.export import lora_export_tensors
from qrlora.cli.merge import grid_main, merge_main
from qrlora.merging.klora import balance_factor, selects_content, time_scale, topk_sum
from qrlora.merging.merger import Merger

STEPS = 4
RENDER = ["--height", "64", "--width", "64", "--num_inference_steps", str(STEPS), "--dtype", "float32", "--device", "cpu"]
PROMPT = "a photo of a <c> cat in <s> style"


def pixels(image) -> np.ndarray:
    image = Image.open(image) if not isinstance(image, Image.Image) else image
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def mixed_pair(tiny_sd3, tmp_path_factory):
    """A plain-LoRA content adapter and a QR-LoRA (triu_deltaR) style adapter: the strategies mix methods."""
    root = tmp_path_factory.mktemp("pair")
    content = make_adapter(tiny_sd3, "sd3", root / "content.safetensors", method="lora", seed=2)
    style = make_adapter(tiny_sd3, "sd3", root / "style.safetensors", method="triu_deltaR", seed=1)
    return content, style


def _tiny_pipe(model_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **extra):
    return pipe(prompt=PROMPT, num_inference_steps=STEPS, height=64, width=64,
                generator=torch.Generator(device="cpu").manual_seed(0), **extra).images[0]


def test_direct_strategy_is_the_plain_merger_bit_for_bit(tiny_sd3, mixed_pair, tmp_path):
    content, style = mixed_pair
    grid_main(["--model_path", str(tiny_sd3), "--style_lora_path", str(style), "--content_lora_path", str(content),
               "--style_weights", "0.5", "--content_weights", "1", "--merge_strategy", "direct", *RENDER,
               "--output_dir", str(tmp_path)])
    pipe = _tiny_pipe(tiny_sd3)  # the plain route: Merger on the denoiser, then the pipeline
    Merger(pipe.transformer, [load_adapter(style), load_adapter(content)]).merge([0.5, 1.0])
    assert np.array_equal(pixels(_call(pipe)), pixels(tmp_path / "inference_s0.50_c1.00.png"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == [{"file": "inference_s0.50_c1.00.png", "prompt": PROMPT, "strategy": "direct",
                         "method": "lora+triu_deltaR", "style_weight": 0.5, "content_weight": 1.0, "seed": 0}]


def test_klora_scores_follow_the_paper():
    dw = torch.tensor([[3.0, -7.0], [0.5, -1.0]])
    assert topk_sum(dw, 2) == 10.0 and topk_sum(dw, 10) == 11.5  # K above the size takes every entry
    content = {"a": torch.full((2, 2), 2.0), "b": torch.ones(2, 2), "only_c": torch.ones(1, 1)}
    style = {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}
    assert balance_factor(content, style) == pytest.approx((2.0 + 1.0) / 2)
    assert time_scale(0.0) == 0.5 and time_scale(0.5) == pytest.approx(1.25)
    assert selects_content(3.0, 1.0, 1.5, 1.99) and not selects_content(3.0, 1.0, 1.5, 2.0)  # strict, eq. 6


def test_klora_equals_direct_recomputation(tiny_sd3, mixed_pair, tmp_path):
    """K-LoRA rendered live == the same choice recomputed from the files and folded into W at every step."""
    content, style = mixed_pair
    w_content, w_style = 1.0, 0.8
    path = merge_main(["--model_path", str(tiny_sd3), "--adapters", str(content), str(style), "--weights",
                       f"{w_content},{w_style}", "--merge_strategy", "klora", "--prompt", PROMPT, *RENDER,
                       "--output_dir", str(tmp_path)])

    # Direct re-computation of the paper's rule (eq. 4-6) from each file's dW, with the default K, alpha, beta.
    dw_c, dw_s = load_adapter(content).delta_weights(), load_adapter(style).delta_weights()
    top = {p: (dw_c[p].abs().flatten().sort(descending=True).values[:64].sum().item(),
               dw_s[p].abs().flatten().sort(descending=True).values[:64].sum().item()) for p in dw_c}
    gamma = float(np.mean([dw_c[p].abs().sum().item() / dw_s[p].abs().sum().item() for p in dw_c]))

    def content_acts(p, step):
        s_c, s_s = top[p]
        return s_c / gamma > (1.5 * step / STEPS + 0.5) * s_s

    pipe = _tiny_pipe(tiny_sd3)
    originals = {p: pipe.transformer.get_submodule(p).weight.detach().clone() for p in dw_c}

    def fold(step):
        with torch.no_grad():
            for p, W in originals.items():
                delta = w_content * dw_c[p] if content_acts(p, step) else w_style * dw_s[p]
                pipe.transformer.get_submodule(p).weight.copy_(W + delta)

    fold(0)
    expected = _call(pipe, callback_on_step_end=lambda pipe_, i, t, kw: (fold(i + 1), {})[1])
    assert np.abs(pixels(expected) - pixels(path)).max() <= 1
    # Not a trivial schedule: both adapters act, and some layer switches between steps.
    choices = [[content_acts(p, i) for i in range(STEPS)] for p in dw_c]
    assert any(any(c) for c in choices) and any(not all(c) for c in choices)
    assert any(len(set(c)) == 2 for c in choices)


def test_ziplora_learns_and_writes_a_normal_adapter(tiny_sd3, mixed_pair, tmp_path):
    from qrlora.cli.ziplora import main as ziplora_main

    content, style = mixed_pair
    out = tmp_path / "zip.safetensors"
    ziplora_main(["--model_path", str(tiny_sd3), "--content_lora_path", str(content), "--style_lora_path", str(style),
                  "--content_prompt", "a photo of a <c> cat", "--style_prompt", "a landscape in <s> style",
                  "--ziplora_steps", "8", "--ziplora_lr", "0.02", "--output", str(out), *RENDER])
    zipped = load_adapter(out)
    meta = zipped.metadata
    assert zipped.config.method == "lora" and meta["merge_strategy"] == "ziplora"
    assert json.loads(meta["merged_from"]) == [str(content), str(style)]
    assert float(meta["ziplora_objective_end"]) < float(meta["ziplora_objective_start"])  # the objective falls

    # Every column of the merged change is m_c[j] dW_c[:, j] + m_s[j] dW_s[:, j] (paper eq. 3), with learned m != 1.
    dw_c, dw_s, dw_m = load_adapter(content).delta_weights(), load_adapter(style).delta_weights(), zipped.delta_weights()
    assert dw_m.keys() == dw_c.keys()
    moved = 0.0
    for p in dw_m:
        basis = torch.stack([dw_c[p], dw_s[p]], dim=-1).permute(1, 0, 2).double()  # (in, out, 2)
        coeffs = torch.linalg.lstsq(basis, dw_m[p].T.double().unsqueeze(-1)).solution  # (in, 2, 1)
        assert torch.allclose((basis @ coeffs).squeeze(-1), dw_m[p].T.double(), atol=1e-5)
        moved = max(moved, float((coeffs - 1).abs().max()))
    assert moved > 1e-3

    # Other tools read it: a plain merge renders it, the LoRA export takes it.
    assert merge_main(["--model_path", str(tiny_sd3), "--adapters", str(out), "--prompt", PROMPT, *RENDER,
                       "--output_dir", str(tmp_path / "render")]).is_file()
    assert len(lora_export_tensors(zipped)) == 2 * len(dw_m)


def test_strategy_refusals(tiny_sd3, mixed_pair, tmp_path, capsys):
    content, style = mixed_pair
    moe = make_adapter(tiny_sd3, "sd3", tmp_path / "moe.safetensors", method="moe", rank=4, num_experts=2)
    base = ["--model_path", str(tiny_sd3), *RENDER, "--output_dir", str(tmp_path / "out")]
    cases = {
        "exactly one content and one style": ["--adapters", str(content), str(style), str(style), "--merge_strategy", "klora"],
        "--residual_path": ["--adapters", str(content), str(style), "--merge_strategy", "ziplora", "--residual_path", str(style)],
        "token-dependent": ["--adapters", str(content), str(moe), "--merge_strategy", "klora"],
        "--save_merged": ["--adapters", str(content), str(style), "--merge_strategy", "klora", "--save_merged", str(tmp_path / "m")],
        "--content_prompt": ["--adapters", str(content), str(style), "--merge_strategy", "ziplora"],
    }
    for expected, flags in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            merge_main([*base, *flags])
        lines = error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], (expected, lines)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_render_and_strategy_settings_are_checked_once_naming_the_flag():
    """The typed settings the merge library takes: built from parsed flags by one function, every field checked."""
    import argparse

    from qrlora.cli.arguments import settings_from
    from qrlora.errors import UserError
    from qrlora.merging.settings import RenderSettings, StrategySettings

    parsed = argparse.Namespace(height=32, width=48, seed=3, prompt="p", merge_density=0.25, unrelated="x")
    render, settings = settings_from(RenderSettings, parsed), settings_from(StrategySettings, parsed)
    assert (render.height, render.width, render.seed, render.prompt) == (32, 48, 3, "p")
    assert settings.merge_density == 0.25 and render.call_kwargs()["height"] == 32
    for build, expected in ((lambda: RenderSettings(height=30), "--height must be a positive multiple of 16"),
                            (lambda: RenderSettings(num_inference_steps=0), "--num_inference_steps"),
                            (lambda: RenderSettings(dtype="int8"), "--dtype"),
                            (lambda: StrategySettings(merge_density=0.0), "--merge_density"),
                            (lambda: StrategySettings(klora_k=0), "--klora_k")):
        with pytest.raises(UserError, match=expected):
            build()
