"""Tests for qrlora.toy.tiny: offline tiny pipelines load, draw, are seeded, and guard their folder."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from qrlora.toy import tiny
from qrlora.cli.tiny import main as tiny_main

PIPELINES = {
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
DENOISER = {"sd3": "transformer", "flux": "transformer", "sdxl": "unet"}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, pathlib.Path]:
    """One seed-0 pipeline per backbone, shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny")
    return {b: tiny.build_tiny_pipeline(b, root / b, seed=0) for b in tiny.BACKBONES}


def _weights(path: pathlib.Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file in a pipeline folder, keyed by its relative path."""
    return {str(f.relative_to(path)): load_file(f) for f in sorted(path.rglob("*.safetensors"))}


def test_backbones_and_layout(built):
    assert tiny.BACKBONES == ("sd3", "flux", "sdxl")
    for backbone, path in built.items():
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == PIPELINES[backbone].__name__
        expected = {"vae", "scheduler", DENOISER[backbone], "text_encoder", "text_encoder_2", "tokenizer"}
        expected |= {"tokenizer_2"} | ({"text_encoder_3", "tokenizer_3"} if backbone == "sd3" else set())
        assert expected <= {p.name for p in path.iterdir() if p.is_dir()}
        # no temporary build folders left next to the result
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_pipeline_loads_offline_and_draws(built, backbone):
    pipe = PIPELINES[backbone].from_pretrained(built[backbone])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 1e-3  # not a constant image


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_tokenizers_cover_text_encoders(built, backbone):
    pipe = PIPELINES[backbone].from_pretrained(built[backbone])
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, "tokenizer" + suffix, None)
        if tokenizer is None:
            continue
        encoder = getattr(pipe, "text_encoder" + suffix)
        ids = tokenizer("a photo of sks dog").input_ids
        assert len(ids) > 2 and tokenizer.unk_token_id not in ids[1:-1]
        assert encoder.config.vocab_size >= len(tokenizer)
        padded = tokenizer(
            "a photo of sks dog", padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        assert len(padded) == tokenizer.model_max_length
        assert max(padded) < encoder.config.vocab_size
    # FLUX's trainer pads T5 prompts to 512 tokens
    if backbone == "flux":
        assert pipe.tokenizer_2.model_max_length == 512


@pytest.mark.parametrize("backbone", tiny.BACKBONES)
def test_same_seed_is_bit_identical(built, backbone, tmp_path):
    rng_before = torch.random.get_rng_state()
    again = _weights(tiny.build_tiny_pipeline(backbone, tmp_path / "again", seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    first = _weights(built[backbone])
    assert first.keys() == again.keys()
    for name in first:
        assert first[name].keys() == again[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], again[name][key]), f"{name}:{key}"

    other = _weights(tiny.build_tiny_pipeline(backbone, tmp_path / "other", seed=1))
    denoiser = next(n for n in first if n.startswith(DENOISER[backbone] + "/"))
    assert any(not torch.equal(first[denoiser][k], other[denoiser][k]) for k in first[denoiser])


def test_reuses_existing_pipeline(built, capsys):
    path = built["sdxl"]
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    tiny_main(["--backbone", "sdxl", "--output", str(path)])
    assert "reus" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before
    assert tiny.build_tiny_pipeline("sdxl", path) == path


def test_empty_dir_is_filled(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    tiny_main(["--backbone", "flux", "--output", str(target)])
    assert (target / "model_index.json").is_file()


@pytest.mark.parametrize(
    "backbone,setup",
    [
        ("sd3", "foreign"),  # some unrelated non-empty folder
        ("flux", "other_backbone"),  # a tiny pipeline, but of another backbone
        ("sdxl", "other_seed"),  # a tiny sdxl pipeline built with another seed
    ],
)
def test_refuses_foreign_dir(built, tmp_path, backbone, setup, capsys):
    if setup == "foreign":
        target = tmp_path / "foreign"
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    elif setup == "other_backbone":
        target = built["sd3"]
    else:
        target = built["sdxl"]
    seed = 1 if setup == "other_seed" else 0
    snapshot = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    siblings = sorted(p.name for p in target.parent.iterdir())

    with pytest.raises(SystemExit) as excinfo:
        tiny_main(["--backbone", backbone, "--output", str(target), "--seed", str(seed)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert excinfo.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0]

    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == snapshot
    assert sorted(p.name for p in target.parent.iterdir()) == siblings
    with pytest.raises(FileExistsError):
        tiny.build_tiny_pipeline(backbone, target, seed=seed)


def test_unknown_backbone_rejected(tmp_path):
    with pytest.raises(ValueError):
        tiny.build_tiny_pipeline("sd15", tmp_path / "x")
    with pytest.raises(SystemExit):
        tiny_main(["--backbone", "sd15", "--output", str(tmp_path / "x")])
