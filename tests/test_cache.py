"""``--cache_dir``: a second run loads no text encoder and no VAE and trains the bit-identical adapter; a changed
prompt or image is a miss; a corrupt entry is refused in one warning and computed again."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from PIL import Image

from conftest import REPO
from qrlora.backbones.base import Backbone
from qrlora.training.cache import DiskCache
from qrlora.files.checkpoint import load_adapter


def run(model, out, cache, images, prompt="a photo of a <c> cat", *extra):
    from qrlora.cli.train import main

    return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
                 "--instance_prompt", prompt, "--resolution", "64", "--max_train_steps", "2", "--max_sequence_length", "16",
                 "--output_dir", str(out), "--lora_init_method", "triu_deltaR", "--cache_dir", str(cache), *extra])


def entries(cache, kind):
    return sorted(p for p in cache.glob("*.json") if p.name != "file_hashes.json" and json.loads(p.read_text())["key"]["kind"] == kind)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(REPO / "assets/cnt/cat", folder)
    return folder


@pytest.fixture
def loads(monkeypatch):
    """Counts of text-pipeline and VAE loads; ``loads.forbid()`` makes every later load raise."""
    counts = {"text": 0, "vae": 0, "forbidden": False}
    text, vae = Backbone.load_text_pipeline, Backbone.load_vae

    def counted(kind, original):
        def load(self, *args, **kwargs):
            if counts["forbidden"]:
                raise AssertionError(f"the {kind} was loaded although everything was cached")
            counts[kind] += 1
            return original(self, *args, **kwargs)
        return load

    monkeypatch.setattr(Backbone, "load_text_pipeline", counted("text", text))
    monkeypatch.setattr(Backbone, "load_vae", counted("vae", vae))
    counts["forbid"] = lambda: counts.update(forbidden=True)
    return counts


def same(a, b):
    return all(torch.equal(t, b.layers[p][n]) for p, named in a.layers.items() for n, t in named.items())


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd3"])
def test_second_run_loads_no_encoder_and_is_bit_identical(fixture, request, tmp_path, images, loads):
    model, cache = request.getfixturevalue(fixture), tmp_path / "cache"
    first = load_adapter(run(model, tmp_path / "a", cache, images))
    assert loads["text"] == 1 and loads["vae"] == 1
    assert len(entries(cache, "prompts")) == 1 and len(entries(cache, "latents")) == len(list(images.iterdir()))
    loads["forbid"]()
    second = load_adapter(run(model, tmp_path / "b", cache, images))
    assert same(first, second)
    # Without any cache the trainer computes the same tensors (in memory): the same adapter again.
    from qrlora.cli.train import main
    loads["forbidden"] = False
    plain = main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images), "--instance_prompt",
                  "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "2", "--max_sequence_length", "16",
                  "--output_dir", str(tmp_path / "c"), "--lora_init_method", "triu_deltaR", "--cache_latents"])
    assert same(first, load_adapter(plain))


def test_changed_prompt_or_image_is_a_miss(tiny_sd3, tmp_path, images, loads):
    cache = tmp_path / "cache"
    run(tiny_sd3, tmp_path / "a", cache, images)
    latents = len(entries(cache, "latents"))
    run(tiny_sd3, tmp_path / "b", cache, images, "a photo of a <c> kitten")
    # A new caption: text encoders again, and each image's latents again (entries are keyed on the caption and
    # the bucket too, so an entry records what it was encoded for and is never reused for another caption).
    assert loads["text"] == 2 and loads["vae"] == 2
    assert len(entries(cache, "prompts")) == 2 and len(entries(cache, "latents")) == 2 * latents
    first = sorted(images.iterdir())[0]
    with Image.open(first) as img:
        img.convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(first)
    run(tiny_sd3, tmp_path / "c", cache, images, "a photo of a <c> kitten")
    assert loads["text"] == 2 and loads["vae"] == 3  # one changed image: the VAE again, one more latent entry
    assert len(entries(cache, "latents")) == 2 * latents + 1


@pytest.mark.parametrize("damage", ["tensors", "json"])
def test_corrupt_entry_is_refused_and_recomputed(tiny_sd3, tmp_path, images, loads, caplog, damage):
    cache = tmp_path / "cache"
    first = load_adapter(run(tiny_sd3, tmp_path / "a", cache, images))
    entry = entries(cache, "prompts")[0]
    target = entry.with_suffix(".safetensors") if damage == "tensors" else entry
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="qrlora.cache"):
        second = load_adapter(run(tiny_sd3, tmp_path / "b", cache, images))
    warnings = [r.getMessage() for r in caplog.records if r.name == "qrlora.cache"]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "corrupt" in warnings[0]
    assert loads["text"] == 2 and loads["vae"] == 1  # the prompt entry recomputed, the latents read back
    assert same(first, second)
    assert DiskCache(cache).get(json.loads(entry.read_text())["key"]) is not None  # rewritten whole


def test_cache_dir_that_is_a_file_is_one_line(tiny_sd3, tmp_path, images, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        run(tiny_sd3, tmp_path / "a", tmp_path / "file", images)
    assert exc.value.code == 2 and "--cache_dir" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_validation_loads_the_vae_lazily_and_no_text_encoder(tiny_sd3, tmp_path, images, loads):
    cache, validate = tmp_path / "cache", ["--validation_prompt", "a <c> cat", "--num_validation_images", "1",
                                           "--validation_inference_steps", "1"]
    run(tiny_sd3, tmp_path / "a", cache, images, "a photo of a <c> cat", *validate)
    assert len(entries(cache, "negative")) == 1
    text, vae = loads["text"], loads["vae"]
    out = tmp_path / "b"
    run(tiny_sd3, out, cache, images, "a photo of a <c> cat", *validate)
    assert loads["text"] == text and loads["vae"] == vae + 1  # the decoder for the validation images only
    assert list((out / "validation").glob("*.png"))
