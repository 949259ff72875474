"""What a first GPU hour would find, shown on the CPU at the smallest size that shows it (issue 28): checkpoints
stored in bf16 load as stored, validation with a bf16 base and no mixed precision, fp8 / nf4 bases quantized on the
host before the move, merges into bf16 weights that keep the change, the ``qr`` method under bf16 autocast."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, make_adapter

# The optional quantization libraries, installed (by pip, pinned, without their dependencies) into a folder of their
# own that only the subprocesses below see: torchao prints load notices on every diffusers import once it is
# importable, which would leak into every other test of a worker that imported it.
OPTIONAL = REPO / ".optional-deps"
OPTIONAL_PINS = ["torchao==0.18.0", "bitsandbytes==0.50.2"]


@pytest.fixture(scope="session")
def optional_deps() -> Path:
    marker = OPTIONAL / ("installed-" + "-".join(OPTIONAL_PINS).replace("=", ""))
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                        str(OPTIONAL), *OPTIONAL_PINS], check=True)
        marker.touch()
    return OPTIONAL


@pytest.fixture(scope="module")
def bf16_flux(tiny_flux, tmp_path_factory) -> Path:
    """The tiny FLUX pipeline with its transformer stored in bf16, as FLUX.1-dev ships."""
    import shutil

    from diffusers import FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("bf16") / "flux"
    shutil.copytree(tiny_flux, folder)
    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer", torch_dtype=torch.bfloat16)
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")
    return folder


def test_a_bf16_checkpoint_loads_as_stored_not_upcast(bf16_flux, tiny_flux):
    from qrlora.backbones import BACKBONES
    from qrlora.core.devices import stored_dtype

    assert stored_dtype(str(bf16_flux), "transformer") == torch.bfloat16
    assert stored_dtype(str(tiny_flux), "transformer") == torch.float32
    flux = BACKBONES["flux"]
    loaded = flux.load_denoiser(str(bf16_flux))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}  # diffusers alone would give float32
    assert {p.dtype for p in flux.load_denoiser(str(bf16_flux), torch.float32).parameters()} == {torch.float32}


def test_residual_of_a_bf16_checkpoint_equals_the_float32_load(bf16_flux, tmp_path):
    """The residual is computed in float32 per layer from the weights as stored: loading bf16 as stored (half the
    host memory) gives exactly the residual the float32 upcast load gave."""
    from qrlora.backbones import BACKBONES
    from qrlora.cli.residual import save_base_residual_main
    from qrlora.core.methods import AdapterConfig
    from qrlora.files.checkpoint import load_residual
    from qrlora.files.residual import base_residuals

    saved = load_residual(save_base_residual_main(["--model_path", str(bf16_flux), "--rank", "4", "--device", "cpu",
                                                   "--output_dir", str(tmp_path / "a")], "flux"))
    flux = BACKBONES["flux"]
    upcast = base_residuals(flux.load_denoiser(str(bf16_flux), torch.float32), AdapterConfig(method="triu_deltaR", rank=4),
                            list(flux.default_targets))
    assert saved.keys() == upcast.keys() and saved
    assert all(torch.equal(saved[k], upcast[k]) for k in saved)


@pytest.mark.parametrize("backbone,method", [("sd3", "triu_deltaR"), ("flux", "triu_deltaR"),
                                            ("flux", "qr_input_frozen"), ("sd3", "ortho_adapt")])
def test_validation_runs_with_a_bf16_base_and_no_mixed_precision(backbone, method, tiny_sd3, tiny_flux, tmp_path):
    """Issue 28: the first validation died with a dtype mismatch (fp32 prompt embeddings into a bf16 base). The
    input-frozen methods of issue 32 (their frozen side on the input, ``dW = s dR^T Q^T`` / ``lora_B lora_A``) take the
    same bf16 path: trained, validated, and saved with finite float32 tensors whose trained side moved."""
    from safetensors.torch import load_file

    from qrlora.cli.train import main

    model = {"sd3": tiny_sd3, "flux": tiny_flux}[backbone]
    out = tmp_path / "run"
    saved = main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                  "--instance_prompt", "a photo of a <c> cat", "--resolution", "32", "--max_train_steps", "2",
                  "--output_dir", str(out), "--base_precision", "bf16", "--mixed_precision", "no",
                  "--lora_init_method", method, "--learning_rate", "1e-2",
                  "--validation_prompt", "a <c> cat", "--num_validation_images", "1", "--validation_inference_steps", "2"])
    images = sorted((out / "validation").glob("*.png"))
    assert images  # the final validation rendered (it used to die at the first one)
    tensors = load_file(str(saved))
    assert tensors and all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in tensors.values())
    trained = {"triu_deltaR": ".delta_r.", "qr_input_frozen": ".delta_r.", "ortho_adapt": ".lora_B."}[method]  # zero-init
    assert any(trained in k and float(t.abs().max()) > 0 for k, t in tensors.items()), sorted(tensors)[:4]


@pytest.mark.parametrize("strategy", ["direct", "ties"])
def test_a_merge_into_bf16_weights_keeps_the_change(strategy, tiny_sd3, tmp_path):
    """||dW|| / ||W|| about 0.1 %: folded into bf16 weights, ``round(W + dW) - round(W)`` is mostly rounding (164 %
    off ``dW`` in the issue). Merged live, the merged model computes what the trained one computed (the bf16 base
    plus the adapter's path), to within a few percent of the change; folding does not."""
    from peft.utils.merge_utils import ties

    from qrlora.backbones import BACKBONES
    from qrlora.core.inject import attach_adapter
    from qrlora.files.checkpoint import load_adapter
    from qrlora.merging.merger import Merger

    adapter = load_adapter(make_adapter(tiny_sd3, "sd3", tmp_path / "a.safetensors", method="triu_deltaR", noise=0.002))
    path = next(iter(adapter.layers))
    sd3 = BACKBONES["sd3"]
    weight = sd3.load_denoiser(str(tiny_sd3), torch.float32).get_submodule(path).weight
    dW = adapter.method.delta_weight(adapter.layers[path], adapter.config.scale)
    assert 1e-4 < float(dW.norm() / weight.norm()) < 1e-2
    x = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    trained = sd3.load_denoiser(str(tiny_sd3), torch.bfloat16)
    base_out = trained.get_submodule(path)(x).float()
    attach_adapter(trained, adapter.config, adapter.layers)  # the trainer's model: bf16 base + the adapter's path
    want = trained.get_submodule(path)(x).float()
    assert float((want - base_out).norm()) > 0

    def error(fold: bool) -> float:
        model = sd3.load_denoiser(str(tiny_sd3), torch.bfloat16)
        merger = Merger(model, [adapter])
        with merger.folding() if fold else contextlib.nullcontext():
            if strategy == "direct":
                merger.merge([1.0])
            else:
                merger.merge_combined([1.0], lambda p, deltas, w: ties(torch.stack(deltas), torch.tensor(w), 0.999))
        with torch.no_grad():
            got = model.get_submodule(path)(x).float()
        restored = merger.restore().get_submodule(path)
        assert torch.equal(restored(x).float(), base_out)  # restore leaves the base model, live paths removed
        return float((got - want).norm() / (want - base_out).norm())

    live, folded = error(False), error(True)
    assert live < 0.1, live
    assert folded > 0.3, folded  # what the merge did before: the test tells the two apart


def test_the_qr_method_is_exact_under_bf16_autocast():
    """``dW = s (Q R - Q0 R0)`` after a small step: two full products subtracted in bf16 cancel; the difference form
    keeps the path within bf16's precision of the change."""
    from qrlora.core.layers import AdapterState
    from qrlora.core.methods import AdapterConfig

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 192, generator=gen)
    cfg = AdapterConfig(method="qr", rank=16)
    state = AdapterState(cfg, cfg_method_init(cfg, weight))
    with torch.no_grad():
        state.q.add_(torch.randn(state.q.shape, generator=gen) * 1e-3)
        state.base_r.add_(torch.randn(state.base_r.shape, generator=gen) * 1e-3 * state.base_r.abs().mean())
    x = torch.randn(32, 192, generator=gen)
    want = x @ state.delta_weight().T
    assert torch.count_nonzero(want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = state(x.to(torch.bfloat16)).float()
    assert float((got - want).norm() / want.norm()) < 0.05
    # The old path, (x R^T) Q^T - (x R0^T) Q0^T in bf16, for the record of what the test guards against:
    t = {k: v.to(torch.bfloat16) for k, v in state.tensors().items()}
    xb = x.to(torch.bfloat16)
    old = ((xb @ t["base_r"].T) @ t["q"].T - (xb @ t["r0"].T) @ t["q0"].T).float() * cfg.scale
    assert float((old - want).norm() / want.norm()) > 0.1


def cfg_method_init(cfg, weight):
    from qrlora.core.methods import get_method

    return get_method(cfg.method).initialize(weight, cfg, "layer")


QUANTIZE_CHECK = r"""
import sys, torch
from diffusers import FluxTransformer2DModel
from qrlora.core.inject import inject_adapters, trainable_parameters
from qrlora.core.layers import cast_base_model_
from qrlora.core.methods import AdapterConfig
from qrlora.core.quantize import quantize_base_

precision, model_dir = sys.argv[1], sys.argv[2]
model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.bfloat16)
inject_adapters(model, AdapterConfig(method="triu_deltaR", rank=4), ["attn.to_q", "attn.to_k"])
cast_base_model_(model, torch.bfloat16)
layer = model.transformer_blocks[0].attn.to_q
before = layer.base_layer.weight.detach().float().clone()
quantize_base_(model, precision)  # on the host, before any move
base = model.transformer_blocks[0].attn.to_q.base_layer
kind = type(base.weight).__name__
assert kind in ("Float8Tensor", "Params4bit"), kind
x = torch.randn(3, base.in_features, dtype=torch.bfloat16)
params = trainable_parameters(model)
with torch.no_grad():
    layer.adapters["default"].delta_r.add_(0.01)
y = layer(x)
y.float().sum().backward()
assert all(p.dtype == torch.float32 for p in params)
assert layer.adapters["default"].delta_r.grad is not None and torch.isfinite(layer.adapters["default"].delta_r.grad).all()
err = float((base(x).float() - x.float() @ before.T - (base.bias.float() if base.bias is not None else 0)).norm() / (x.float() @ before.T).norm())
print(kind, "quantization error", err)
assert err < 0.2, err
"""


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_a_quantized_base_is_made_on_the_host_and_trains(precision, optional_deps, tiny_flux):
    """fp8 (torchao's Float8WeightOnlyConfig: the old float8_weight_only import is gone from torchao 0.18) and nf4
    (bitsandbytes' CPU backend) quantize the bf16 base where it lies, and the adapter trains on top."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(optional_deps), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", QUANTIZE_CHECK, precision, str(tiny_flux)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantization error" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_the_trainer_runs_on_a_quantized_base_on_cpu(precision, optional_deps, tiny_flux, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(optional_deps), str(REPO)])}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "qrlora.train", "--pretrained_model_name_or_path", str(tiny_flux),
                           "--instance_data_dir", str(REPO / "assets/cnt/cat"), "--instance_prompt", "a <c> cat",
                           "--resolution", "32", "--max_train_steps", "2", "--output_dir", str(out),
                           "--base_precision", precision, "--mixed_precision", "bf16"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from qrlora.files.checkpoint import load_adapter

    adapter = load_adapter(out / "pytorch_lora_weights.safetensors")
    assert any(float(t["delta_r"].abs().sum()) > 0 for t in adapter.layers.values())


def test_flux_trains_at_the_guidance_it_renders_with(tiny_flux):
    """FLUX.1-dev is guidance-distilled: diffusers' FLUX DreamBooth script trains at guidance 3.5, and so does the
    trainer unless --guidance_scale says otherwise (it trained at 1.0 before)."""
    from qrlora.backbones import BACKBONES
    from qrlora.cli.train import build_parser

    flux = BACKBONES["flux"]
    scheduler = flux.load_scheduler(str(tiny_flux))
    assert flux.objective(scheduler).guidance_scale == 3.5
    assert flux.objective(scheduler, guidance_scale=1.0).guidance_scale == 1.0
    assert build_parser().parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "y",
                                      "--instance_prompt", "z"]).guidance_scale is None
