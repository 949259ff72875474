"""SDXL backbone: the DDPM objective, both SDXL wrappers end to end on the tiny pipeline, v-prediction, min-SNR,
``--lora_blocks``, and bad input through the wrappers."""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open

from conftest import error_lines, make_adapter, run_script
from qrlora.backbones import BACKBONES
from qrlora.files.checkpoint import ADAPTER_FILENAME, load_adapter
from qrlora.core.inject import find_target_modules
from qrlora.core.methods import get_method

FAST = ["--validation_inference_steps", "1", "--num_validation_images", "1", "--mixed_precision", "no"]
BLOCK = "up_blocks.0.attentions.0"
SDXL = BACKBONES["sdxl"]


@pytest.fixture(scope="module")
def base_unet(tiny_sdxl):
    return UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")


def train(task, model, out, *extra, check=True):
    env = {"MODEL_NAME": str(model), "OUTPUT_DIR": str(out), "MAX_TRAIN_STEPS": "2", "RESOLUTION": "64"}
    return run_script(["bash", f"SDXL_dir/train_deltaR_{task}.sh", "cpu", "4", *FAST, *extra], env=env, check=check)


def logged_losses(stderr: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss=([-+0-9.eEnaif]+)", stderr)]


def check_adapter(out, base_unet, blocks=()):
    """Native file of the unet: metadata, keys, dR trained and upper-triangular, Q/R = fresh decomposition."""
    path = out / ADAPTER_FILENAME
    adapter = load_adapter(path)
    meta = adapter.metadata
    assert (meta["backbone"], meta["component"], meta["method"], meta["rank"]) == ("sdxl", "unet", "triu_deltaR", "4")
    assert json.loads(meta["lora_blocks"]) == list(blocks)
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    expected = find_target_modules(base_unet, SDXL.default_targets, list(blocks) or None)
    assert sorted(adapter.layers) == sorted(expected)
    method = get_method("triu_deltaR")
    for layer, tensors in adapter.layers.items():
        fresh = method.initialize(base_unet.get_submodule(layer).weight, adapter.config, layer)
        torch.testing.assert_close(tensors["q"], fresh["q"], rtol=0, atol=1e-6)
        torch.testing.assert_close(tensors["base_r"], fresh["base_r"], rtol=0, atol=1e-6)
        delta = tensors["delta_r"]
        assert torch.isfinite(delta).all() and delta.abs().max() > 0, f"{layer}: dR did not train"
        assert torch.count_nonzero(torch.tril(delta, diagonal=-1)) == 0, f"{layer}: dR not upper-triangular"
    return adapter


# ---- in-process: targets, objective, latents ---------------------------------------------------------------
def test_default_targets_are_exactly_the_transformer_attention_projections(base_unet):
    found = find_target_modules(base_unet, SDXL.default_targets)
    expected = [
        f"{block}.{attn}.{proj}"
        for block, module in base_unet.named_modules() if type(module).__name__ == "BasicTransformerBlock"
        for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    assert sorted(found) == sorted(expected) and len(found) == 32  # 4 transformer blocks x 8 in the tiny UNet


def test_latents_scaling_and_optional_mean_std(tiny_sdxl):
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1

    def encode(fn):
        torch.manual_seed(0)
        return fn()

    z = encode(lambda: vae.encode(pixels).latent_dist.sample())
    assert vae.config.shift_factor is None and vae.config.latents_mean is None
    torch.testing.assert_close(encode(lambda: SDXL.latents_from_pixels(vae, pixels)), z * 0.13025)
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.5]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) * 0.13025 / torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(encode(lambda: SDXL.latents_from_pixels(vae, pixels)), expected)


# ---- the wrappers end to end ------------------------------------------------------------------------------
def test_style_wrapper_trains_the_unet_attention(tiny_sdxl, base_unet, tmp_path):
    proc = train("sty", tiny_sdxl, tmp_path / "out")
    check_adapter(tmp_path / "out", base_unet)
    assert len(list((tmp_path / "out" / "validation").glob("*.png"))) == 2  # mid-run and final, text encoders dropped
    assert (tmp_path / "out" / "train_deltaR_sty.sh").is_file()
    losses = logged_losses(proc.stderr)
    assert losses and all(math.isfinite(x) for x in losses)


def test_content_wrapper_v_prediction_blocks_and_min_snr(tiny_sdxl, base_unet, tmp_path):
    """One run for three options: a v-prediction scheduler config, --lora_blocks, --snr_gamma (math: see above)."""
    model = tmp_path / "sdxl_v"
    shutil.copytree(tiny_sdxl, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    proc = train("cnt", model, tmp_path / "out", "--lora_blocks", BLOCK, "--snr_gamma", "5.0")
    adapter = check_adapter(tmp_path / "out", base_unet, blocks=[BLOCK])
    assert adapter.metadata["base_model"] == str(model)  # trained against the v-prediction copy
    assert len(adapter.layers) == 8 and all(p.startswith(BLOCK + ".") for p in adapter.layers)
    losses = logged_losses(proc.stderr)
    assert losses and all(math.isfinite(x) for x in losses)


# ---- bad input: one error line, non-zero exit -------------------------------------------------------------
def test_sd3_pipeline_is_refused(tiny_sd3, tmp_path):
    proc = train("sty", tiny_sd3, tmp_path / "out", check=False)
    errors = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1 and "sd3" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / ADAPTER_FILENAME).exists()


def test_unknown_block_is_refused(tiny_sdxl, tmp_path):
    proc = train("cnt", tiny_sdxl, tmp_path / "out", "--lora_blocks", "up_blocks.7", check=False)
    errors = error_lines(proc.stderr)
    assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "--lora_blocks" in errors[0] and "up_blocks.7" in errors[0]


@pytest.mark.slow
def test_merge_wrapper_and_export_match_diffusers(tiny_sdxl, tmp_path):
    """SDXL_dir/inference_merge.sh end to end; the exported LoRA (keys under unet.) loads in diffusers, same image."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    style = make_adapter(tiny_sdxl, "sdxl", tmp_path / "s.safetensors", seed=1, noise=0.1)
    content = make_adapter(tiny_sdxl, "sdxl", tmp_path / "c.safetensors", method="svd", seed=2, noise=0.1)
    env = {"MODEL_NAME": str(tiny_sdxl), "STYLE_LORA": str(style), "CONTENT_LORA": str(content), "STYLE_WEIGHTS": "0,0.8",
           "CONTENT_WEIGHTS": "1", "STEPS": "2", "HEIGHT": "64", "WIDTH": "64", "OUTPUT_DIR": str(tmp_path / "out"), "DTYPE": "float32"}
    run_script(["bash", "SDXL_dir/inference_merge.sh", "cpu"], env=env)
    assert (tmp_path / "out" / "grid.png").is_file()
    for src, name in ((style, "style"), (content, "content")):
        run_script(["python", "-m", "qrlora.export", str(src), str(tmp_path / f"{name}.lora.safetensors")])
    with safe_open(str(tmp_path / "style.lora.safetensors"), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "style.lora.safetensors"), adapter_name="style")
    pipe.load_lora_weights(str(tmp_path / "content.lora.safetensors"), adapter_name="content")
    pipe.set_adapters(["style", "content"], adapter_weights=[0.8, 1.0])
    theirs = pipe(prompt="a photo of a <c> cat in <s> style", height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images[0]
    ours = Image.open(tmp_path / "out" / "inference_s0.80_c1.00.png")
    assert np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16)).max() <= 1
