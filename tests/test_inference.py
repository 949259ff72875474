"""Residual files, merge inference (residual and delta form), LoRA export through diffusers, bad input."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import error_lines, load_denoiser, make_adapter, one_error, run_script
from qrlora.files.checkpoint import load_adapter, load_residual, save_adapter
from qrlora.cli.merge import grid_main, merge_main
from qrlora.cli.export import main as export_main
from qrlora.cli.residual import extract_main
from qrlora.core.methods import METHODS, get_method

RENDER = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--dtype", "float32", "--device", "cpu"]
def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sd3_pair(tiny_sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_pair")
    return make_adapter(tiny_sd3, "sd3", root / "style.safetensors", seed=1), make_adapter(tiny_sd3, "sd3", root / "content.safetensors", seed=2)


@pytest.mark.parametrize("backbone", ["sd3", "flux"])
def test_residual_form_equals_delta_form(backbone, tiny_sd3, tiny_flux, tmp_path):
    model = {"sd3": tiny_sd3, "flux": tiny_flux}[backbone]
    style = make_adapter(model, backbone, tmp_path / "s.safetensors", seed=1)
    content = make_adapter(model, backbone, tmp_path / "c.safetensors", seed=2)
    run_script([sys.executable, "SD3_dir/extract_residual_from_checkpoint.py", "--model_path", str(model),
                "--lora_path", str(style), "--output_dir", str(tmp_path)])
    residual = tmp_path / f"{backbone}_residual_weights.safetensors"
    common = ["--model_path", str(model), "--style_lora_path", str(style), "--content_lora_path", str(content),
              "--style_weights", "0,1", "--content_weights", "0.5,1", *RENDER]
    if backbone == "flux":
        common += ["--max_sequence_length", "16"]
    grid_main([*common, "--output_dir", str(tmp_path / "delta")])
    grid_main([*common, "--residual_path", str(residual), "--output_dir", str(tmp_path / "residual")])
    for name in ("inference_s0.00_c0.50.png", "inference_s1.00_c1.00.png"):
        a, b = pixels(tmp_path / "delta" / name), pixels(tmp_path / "residual" / name)
        assert np.abs(a - b).max() <= 1, name
    assert not np.array_equal(pixels(tmp_path / "delta" / "inference_s0.00_c0.50.png"),
                              pixels(tmp_path / "delta" / "inference_s1.00_c1.00.png"))
    assert Image.open(tmp_path / "delta" / "grid.png").size[0] > 2 * 64


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].static])
def test_residual_file_is_weight_minus_basis(method, tiny_sd3, tmp_path):
    """The published script's own process is exercised above; here its ``main`` runs in-process for every method."""
    adapter_path = make_adapter(tiny_sd3, "sd3", tmp_path / "a.safetensors", method=method)
    extract_main(["--model_path", str(tiny_sd3), "--lora_path", str(adapter_path), "--output_dir", str(tmp_path)])
    residual = load_residual(tmp_path / "sd3_residual_weights.safetensors")
    adapter = load_adapter(adapter_path)
    denoiser = load_denoiser(tiny_sd3, "sd3")
    for p, tensors in adapter.layers.items():
        W = denoiser.get_submodule(p).weight.detach()
        assert torch.allclose(residual[p], W - adapter.config.scale * get_method(method).basis_product(tensors), atol=1e-6)
    if method in ("triu_deltaR", "svd"):  # seed-independent bases: the base-model route gives the same file
        from qrlora.cli.residual import save_base_residual_main

        save_base_residual_main(["--model_path", str(tiny_sd3), "--rank", "4", "--lora_init_method", method,
                                 "--lora_layers", ",".join(load_adapter(adapter_path).metadata["target_modules"][2:-2].split('", "')),
                                 "--output_dir", str(tmp_path / "base"), "--device", "cpu"], backbone_name="sd3")
        base_route = load_residual(tmp_path / "base" / "sd3_residual_weights.safetensors")
        assert set(base_route) == set(residual)
        assert all(torch.allclose(base_route[p], residual[p], atol=1e-6) for p in residual)


@pytest.mark.parametrize("backbone,method", [("sd3", "triu_deltaR"), pytest.param("flux", "qr", marks=pytest.mark.slow)])
def test_export_loads_in_diffusers_and_matches_our_merge(backbone, method, tiny_sd3, tiny_flux, tmp_path):
    import diffusers

    model = {"sd3": tiny_sd3, "flux": tiny_flux}[backbone]
    style = make_adapter(model, backbone, tmp_path / "s.safetensors", method=method, seed=1, noise=0.1)
    content = make_adapter(model, backbone, tmp_path / "c.safetensors", method="svd", seed=2, noise=0.1)
    extra = ["--max_sequence_length", "16"] if backbone == "flux" else []
    ours = merge_main(["--model_path", str(model), "--adapters", str(style), str(content), "--weights", "0.7,1.0",
                       "--output_dir", str(tmp_path / "ours"), *RENDER, *extra])
    for src, name in ((style, "style"), (content, "content")):  # in-process: the real entry is run by the moe test
        export_main([str(src), str(tmp_path / f"{name}_lora.safetensors")])
    pipe = diffusers.DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "style_lora.safetensors"), adapter_name="style")
    pipe.load_lora_weights(str(tmp_path / "content_lora.safetensors"), adapter_name="content")
    pipe.set_adapters(["style", "content"], adapter_weights=[0.7, 1.0])
    kwargs = {"max_sequence_length": 16} if backbone == "flux" else {}
    theirs = pipe(prompt="a photo of a <c> cat in <s> style", height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    base = pixels(ours)
    assert np.abs(base - np.asarray(theirs, dtype=np.int16)).max() <= 1
    if method == "qr":
        from safetensors import safe_open

        with safe_open(str(tmp_path / "style_lora.safetensors"), "pt") as f:
            assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_A.weight")} == {8}


def test_published_layout_file_merges(tiny_sd3, sd3_pair, tmp_path):
    trained = load_adapter(sd3_pair[0])
    tensors = {f"transformer.{p}.lora.{n}.weight": t[n] for p, t in trained.layers.items() for n in ("q", "base_r", "delta_r")}
    save_file(tensors, tmp_path / "published.safetensors")
    args = ["--model_path", str(tiny_sd3), "--content_lora_path", str(sd3_pair[1]), "--style_weights", "1",
            "--content_weights", "1", *RENDER]
    grid_main([*args, "--style_lora_path", str(tmp_path / "published.safetensors"), "--output_dir", str(tmp_path / "pub")])
    grid_main([*args, "--style_lora_path", str(sd3_pair[0]), "--output_dir", str(tmp_path / "native")])
    name = "inference_s1.00_c1.00.png"
    assert np.array_equal(pixels(tmp_path / "pub" / name), pixels(tmp_path / "native" / name))


def test_moe_live_merge_at_zero_is_the_base_model(tiny_sd3, tmp_path):
    import diffusers

    style = make_adapter(tiny_sd3, "sd3", tmp_path / "s.safetensors", method="moe", seed=1)
    content = make_adapter(tiny_sd3, "sd3", tmp_path / "c.safetensors", method="moe", seed=2)
    env = {"MODEL_NAME": str(tiny_sd3), "STYLE_LORA": str(style), "CONTENT_LORA": str(content), "STYLE_WEIGHTS": "0,1",
           "CONTENT_WEIGHTS": "0", "STEPS": "2", "HEIGHT": "64", "WIDTH": "64", "OUTPUT_DIR": str(tmp_path / "out"), "DTYPE": "float32"}
    run_script(["bash", "SD3_dir/inference_MoE.sh", "cpu"], env=env)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_sd3, torch_dtype=torch.float32)
    base = pipe(prompt="a photo of a <c> cat in <s> style", height=64, width=64, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(pixels(tmp_path / "out" / "inference_s0.00_c0.00.png"), np.asarray(base, dtype=np.int16))
    assert not np.array_equal(pixels(tmp_path / "out" / "inference_s1.00_c0.00.png"), np.asarray(base, dtype=np.int16))


def test_save_merged_writes_a_loadable_denoiser(tiny_sd3, sd3_pair, tmp_path):
    merge_main(["--model_path", str(tiny_sd3), "--adapters", *map(str, sd3_pair), "--weights", "1,0.5",
                "--save_merged", str(tmp_path / "merged"), "--no_render", "--device", "cpu"])
    import diffusers

    merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "merged")
    base = load_denoiser(tiny_sd3, "sd3")
    dW = load_adapter(sd3_pair[0]).delta_weights()
    p = next(iter(dW))
    expected = base.get_submodule(p).weight + dW[p] + 0.5 * load_adapter(sd3_pair[1]).delta_weights()[p]
    assert torch.allclose(merged.get_submodule(p).weight, expected, atol=1e-6)


# ---- bad input: one line, non-zero exit, nothing overwritten -----------------------------------------
@pytest.mark.parametrize("case", ["bad_weights", "missing_file", "moe_residual", "unshared_basis", "other_base_model", "wrong_backbone"])
def test_bad_merge_input(case, tiny_sd3, tiny_flux, sd3_pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"keep me")
    style, content = str(sd3_pair[0]), str(sd3_pair[1])
    model, extra = str(tiny_sd3), []
    expect = {"bad_weights": "--style_weights", "missing_file": "no such file", "moe_residual": "residual form folds weight changes; a moe adapter is token-dependent",
              "unshared_basis": "delta form", "other_base_model": "different base models", "wrong_backbone": "flux adapter"}[case]
    if case == "bad_weights":
        extra = ["--style_weights", "0,half"]
    elif case == "missing_file":
        style = str(tmp_path / "nope.safetensors")
    elif case == "moe_residual":
        content = str(make_adapter(tiny_sd3, "sd3", tmp_path / "m.safetensors", method="moe"))
        extra = ["--residual_path", str(tmp_path / "r.safetensors")]
        save_file({"transformer_blocks.0.attn.to_q.residual.weight": torch.zeros(32, 32)}, tmp_path / "r.safetensors")
    elif case == "unshared_basis":
        content = str(make_adapter(tiny_sd3, "sd3", tmp_path / "r8.safetensors", rank=8))  # another rank
        extract_main(["--model_path", model, "--lora_path", style, "--output_dir", str(tmp_path)])
        extra = ["--residual_path", str(tmp_path / "sd3_residual_weights.safetensors")]
    elif case == "other_base_model":
        from qrlora.files.checkpoint import base_fingerprint  # bases are compared by content (weight norms), not by path

        weights = {p: w for p, w in load_denoiser(tiny_sd3, "sd3").state_dict().items()}
        for name, factor in (("style", 1.0), ("content", 1.5)):
            adapter = load_adapter(style if name == "style" else content)
            adapter.metadata["base_fingerprint"] = base_fingerprint({p: weights[p + ".weight"] * factor for p in adapter.layers})
            path = str(save_adapter(tmp_path / f"{name}.safetensors", adapter))
            style, content = (path, content) if name == "style" else (style, path)
    elif case == "wrong_backbone":
        content = str(make_adapter(tiny_flux, "flux", tmp_path / "f.safetensors"))
    argv = ["--model_path", model, "--style_lora_path", style, "--content_lora_path", content,
            "--output_dir", str(out), *RENDER, *extra]
    if case == "bad_weights":  # the published script in its own process; the other cases call the same main
        proc = run_script([sys.executable, "SD3_dir/inference.py", *argv], check=False)
        errors = error_lines(proc.stderr)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
        error = errors[0]
    else:
        error = one_error(capsys, lambda: grid_main(argv))
    assert expect in error
    assert sorted(p.name for p in out.iterdir()) == ["grid.png"] and (out / "grid.png").read_bytes() == b"keep me"


def test_export_refuses_moe_and_overwrites(tiny_sd3, sd3_pair, tmp_path, capsys):
    moe = make_adapter(tiny_sd3, "sd3", tmp_path / "m.safetensors", method="moe")
    proc = run_script([sys.executable, "-m", "qrlora.export", str(moe), str(tmp_path / "x.safetensors")], check=False)
    assert proc.returncode == 2 and "a standard LoRA file is a weight change" in proc.stderr and not (tmp_path / "x.safetensors").exists()
    (tmp_path / "keep.safetensors").write_bytes(b"user")  # the same command's main, in-process this time
    with pytest.raises(SystemExit) as exc:
        export_main([str(sd3_pair[0]), str(tmp_path / "keep.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "already exists" in err and (tmp_path / "keep.safetensors").read_bytes() == b"user"
