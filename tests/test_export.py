"""Standard LoRA exports, checked with the clients' own loading code.

Tiny pipelines: every backbone x every static method x both layouts, the exported file loaded back by diffusers
gives the weight change of our merge. Full size (FLUX.1-dev / SD3-medium / SDXL-base built on the meta device):
the kohya key sets are the ones kohya-style loaders expect, and diffusers' kohya conversion maps them back.
"""
import json
import re

import pytest
import torch
from conftest import DENOISER, make_adapter

from qrlora.backbones import BACKBONES
from qrlora.files.checkpoint import AdapterFile, load_adapter, read_safetensors
from qrlora.cli.export import main
from qrlora.files.export import export_lora
from qrlora.core.inject import find_target_modules
from qrlora.core.methods import METHODS, AdapterConfig

STATIC_METHODS = [name for name, method in METHODS.items() if method.static]


@pytest.fixture(scope="module")
def tiny(tiny_root, tiny_sd3, tiny_flux):
    from qrlora.toy.tiny import build_tiny_pipeline

    return {"sd3": tiny_sd3, "flux": tiny_flux, "sdxl": build_tiny_pipeline("sdxl", tiny_root / "sdxl")}


@pytest.fixture(scope="module")
def pipes(tiny):
    """One diffusers pipeline per backbone, loaded on first use; adapters are loaded into it and deleted again."""
    cache = {}

    def get(backbone):
        if backbone not in cache:
            cache[backbone] = BACKBONES[backbone].pipeline_cls().from_pretrained(tiny[backbone])
        return cache[backbone]

    return get


def delta_errors(pipe, backbone, adapter, adapter_name):
    """Largest |PEFT's dW - our dW| over the adapter's layers, after diffusers loaded the file into ``pipe``."""
    denoiser = getattr(pipe, DENOISER[backbone][1])
    ours = adapter.delta_weights()
    errors = {p: (denoiser.get_submodule(p).get_delta_weight(adapter_name) - dw).abs().max().item() for p, dw in ours.items()}
    scale = max(dw.abs().max().item() for dw in ours.values())
    return max(errors.values()), scale


@pytest.mark.parametrize("method", STATIC_METHODS)
@pytest.mark.parametrize("backbone", ["sd3", "flux", "sdxl"])
def test_diffusers_layout_loads_as_our_merge(tiny, pipes, tmp_path, backbone, method):
    adapter = load_adapter(make_adapter(tiny[backbone], backbone, tmp_path / "a.safetensors", method=method, rank=4))
    out = export_lora(adapter, tmp_path / "lora.safetensors")
    tensors, meta = read_safetensors(out)
    component = adapter.component
    assert set(tensors) == {f"{component}.{p}.lora_{x}.weight" for p in adapter.layers for x in "AB"}  # tensor keys unchanged
    assert not any(k.endswith(".alpha") for k in tensors)
    config = json.loads(meta["lora_adapter_metadata"])
    rank = 2 * 4 if method == "qr" else 4  # qr exports [R; R0] against s [Q, -Q0]
    assert config[f"{component}.r"] == config[f"{component}.lora_alpha"] == rank
    assert sorted(config[f"{component}.target_modules"]) == sorted(adapter.layers)

    pipe = pipes(backbone)
    pipe.load_lora_weights(str(out), adapter_name="exported")
    try:
        peft_config = getattr(pipe, component).peft_config["exported"]  # configured from the file's metadata
        assert (peft_config.r, peft_config.lora_alpha) == (rank, rank)
        err, scale = delta_errors(pipe, backbone, adapter, "exported")
        assert scale > 1e-3 and err <= 1e-5 * scale
    finally:
        pipe.delete_adapters("exported")


# ---- kohya layout -----------------------------------------------------------------------------------------
SD3_KOHYA = re.compile(r"lora_unet_joint_blocks_(\d+)_(x_block|context_block)_(attn_qkv|attn_proj|mlp_fc1|mlp_fc2)")


class _ZerosForMissing(dict):
    """An original SD3 checkpoint holding only the LoRA deltas; every other tensor reads as zeros."""

    def __missing__(self, key):
        return torch.zeros(6, 6)

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6)


def sd3_kohya_back_to_diffusers(path) -> dict[str, torch.Tensor]:
    """dW per diffusers path of an SD3 kohya file, through diffusers' own original->diffusers SD3 converter.

    diffusers has no SD3 kohya LoRA loader, so this applies the file as ComfyUI does (``W += alpha / rank * up
    down`` on the original module ``joint_blocks.i.x_block.attn.qkv`` ...) onto a zero checkpoint and lets
    ``convert_sd3_transformer_checkpoint_to_diffusers`` split the fused q, k, v.
    """
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    tensors, _ = read_safetensors(path)
    original = _ZerosForMissing()
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            i, block, module = SD3_KOHYA.fullmatch(name).groups()
            down, up, alpha = tensors[key], tensors[f"{name}.lora_up.weight"], tensors[f"{name}.alpha"]
            original[f"joint_blocks.{i}.{block}.{module.replace('_', '.')}.weight"] = alpha / down.shape[0] * up @ down
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original)
    return {k[: -len(".weight")]: v for k, v in converted.items() if v.dim() == 2 and v.abs().sum() > 0}


@pytest.mark.parametrize("method", STATIC_METHODS)
@pytest.mark.parametrize("backbone", ["sd3", "flux", "sdxl"])
def test_kohya_layout_converted_back_by_diffusers(tiny, pipes, tmp_path, backbone, method):
    adapter = load_adapter(make_adapter(tiny[backbone], backbone, tmp_path / "a.safetensors", method=method, rank=4))
    if backbone == "flux":
        # diffusers' FLUX kohya converter hard-codes FLUX.1's single-block widths (3072 x 3 + 12288): single blocks
        # are checked at full size below; here the double blocks, on the tiny model.
        adapter.layers = {p: t for p, t in adapter.layers.items() if p.startswith("transformer_blocks.")}
    out = export_lora(adapter, tmp_path / "kohya.safetensors", "kohya")
    tensors, _ = read_safetensors(out)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            assert tensors[key.replace(".lora_down.weight", ".alpha")].item() == down.shape[0]  # alpha = rows of down
    if backbone == "sd3":
        back = sd3_kohya_back_to_diffusers(out)
        ours = adapter.delta_weights()
        assert set(back) == set(ours)
        assert all(torch.allclose(back[p], ours[p], atol=1e-6) for p in ours)
        return
    pipe = pipes(backbone)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    try:
        err, scale = delta_errors(pipe, backbone, adapter, "kohya")
        assert scale > 1e-3 and err <= 1e-5 * scale
    finally:
        pipe.delete_adapters("kohya")


def synthetic_adapter(model, backbone, rank=2) -> AdapterFile:
    """A deltaR adapter on the backbone's default targets with random rank-``rank`` factors of the real shapes."""
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for p in find_target_modules(model, BACKBONES[backbone].default_targets):
        out_features, in_features = model.get_submodule(p).weight.shape
        layers[p] = {"q": torch.randn(out_features, rank, generator=gen), "base_r": torch.zeros(rank, in_features),
                     "delta_r": torch.randn(rank, in_features, generator=gen)}
    return AdapterFile(AdapterConfig(method="deltaR", rank=rank), component=DENOISER[backbone][1], layers=layers,
                       metadata={"backbone": backbone}, path=f"<{backbone} full size>")


def expected_kohya_modules(backbone, paths) -> dict[str, int]:
    """The kohya module names a full-size default-target LoRA must have, and each one's number of fused parts."""
    if backbone == "flux":
        names = {f"lora_unet_double_blocks_{i}_{s}_{m}": 3 if m == "attn_qkv" else 1
                 for i in range(19) for s in ("img", "txt") for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
        return {**names, **{f"lora_unet_single_blocks_{i}_linear1": 4 for i in range(38)}}
    if backbone == "sd3":
        names = {f"lora_unet_joint_blocks_{i}_{b}_{m}": 3 if m == "attn_qkv" else 1
                 for i in range(24) for b in ("x_block", "context_block") for m in ("attn_qkv", "attn_proj")}
        del names["lora_unet_joint_blocks_23_context_block_attn_proj"]  # the last block has no context output
        return names
    return {"lora_unet_" + p.replace(".", "_"): 1 for p in paths}  # SDXL: diffusers' UNet names, as ComfyUI maps them


@pytest.mark.parametrize("backbone", ["flux", "sd3", "sdxl"])
def test_kohya_key_sets_at_full_size(tmp_path, backbone):
    model = BACKBONES[backbone].meta_denoiser()
    adapter = synthetic_adapter(model, backbone)
    assert len(adapter.layers) == {"flux": 342, "sd3": 190, "sdxl": 560}[backbone]  # SD3: the last add_q_proj is discarded
    out = export_lora(adapter, tmp_path / "kohya.safetensors", "kohya")
    tensors, _ = read_safetensors(out)
    expected = expected_kohya_modules(backbone, adapter.layers)
    assert set(tensors) == {f"{n}.{s}" for n in expected for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, parts in expected.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == parts * 2 and tensors[f"{name}.alpha"].item() == parts * 2

    probe = {p: torch.randn(t["delta_r"].shape[1]) for p, t in adapter.layers.items()}
    ours = {p: adapter.method.lora_factors(t, 1.0) for p, t in adapter.layers.items()}
    if backbone == "flux":  # diffusers' kohya -> diffusers conversion, as load_lora_weights runs it
        from diffusers import FluxPipeline

        back = FluxPipeline.lora_state_dict(str(out))
        untrained = {k.rsplit(".lora_", 1)[0] for k in back} - {f"transformer.{p}" for p in adapter.layers}
        assert len(untrained) == 38 and all(k.endswith(".proj_mlp") for k in untrained)  # linear1's MLP rows...
        assert all(not back[f"{k}.lora_B.weight"].any() for k in untrained)  # ...come back as an exactly zero change
        for p, (B, A) in ours.items():
            got = back[f"transformer.{p}.lora_B.weight"] @ (back[f"transformer.{p}.lora_A.weight"] @ probe[p])
            assert torch.allclose(got, B @ (A @ probe[p]), rtol=1e-5, atol=1e-4), p
    if backbone == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        back, alphas = StableDiffusionXLPipeline.lora_state_dict(str(out))
        # diffusers' kohya conversion answers in its attention-processor spelling: P.processor.to_q_lora.down.weight
        spelled = re.compile(r"unet\.(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight")
        paths = {"{}.{}".format(*spelled.fullmatch(k).groups()[:2]).replace("to_out", "to_out.0") for k in back}
        assert paths == set(adapter.layers) and len(back) == 2 * 560 and len(alphas) == 560


def test_export_cli(tiny, tmp_path, capsys):
    adapter = make_adapter(tiny["flux"], "flux", tmp_path / "a.safetensors", method="triu_deltaR")
    main([str(adapter), str(tmp_path / "k.safetensors"), "--format", "kohya"])
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in read_safetensors(tmp_path / "k.safetensors")[0])
    main([str(adapter), str(tmp_path / "d.safetensors")])
    assert "lora_adapter_metadata" in read_safetensors(tmp_path / "d.safetensors")[1]
    assert capsys.readouterr().out.count("LoRA modules for") == 2


def test_export_errors(tiny, tmp_path, capsys):
    moe = make_adapter(tiny["sd3"], "sd3", tmp_path / "moe.safetensors", method="moe", rank=4)
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"user file")
    cases = [
        ([str(moe), str(tmp_path / "x.safetensors")], "token-dependent"),
        ([str(moe), str(existing)], "already exists"),
        ([str(tmp_path / "missing.safetensors"), str(tmp_path / "y.safetensors")], "no such file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert existing.read_bytes() == b"user file" and not (tmp_path / "x.safetensors").exists()


def test_the_backbone_of_a_file_is_inferred_in_one_place():
    """``backbone_of_layers``: the recorded family wins; files without metadata (the published code's) are read from
    their layers: single blocks are FLUX, joint blocks alone SD3, a UNet SDXL; nothing fits an unknown component."""
    from qrlora.backbones import backbone_of_layers

    joint = ["transformer_blocks.0.attn.to_q"]
    assert backbone_of_layers("transformer", joint).name == "sd3"
    assert backbone_of_layers("transformer", [*joint, "single_transformer_blocks.3.attn.to_k"]).name == "flux"
    assert backbone_of_layers("transformer", joint, recorded="flux").name == "flux"
    assert backbone_of_layers("unet", ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]).name == "sdxl"
    assert backbone_of_layers("prior", joint) is None
