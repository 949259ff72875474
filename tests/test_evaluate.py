"""CLIP / DINO evaluation of generated images (tiny random scorers) and the one-command comparison."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, error_lines, make_adapter
from qrlora.cli.evaluate import main as evaluate_main
from qrlora.evaluation.evaluate import ImageRecord, clip_prompt, write_manifest

RENDER = ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--dtype", "float32", "--device", "cpu"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    from qrlora.toy.tiny_scorers import build_tiny_scorers

    return build_tiny_scorers(tmp_path_factory.mktemp("scorers"))


def _noise_image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """Two cells (direct s=1 c=1 with two seeds, klora with one), a style and a content reference folder."""
    root = tmp_path_factory.mktemp("images")
    grid, style, content = root / "grid", root / "style", root / "content"
    for folder in (grid, style, content):
        folder.mkdir()
    records = []
    for i, (strategy, seed) in enumerate([("direct", 0), ("direct", 1), ("klora", 0)]):
        _noise_image(i).save(grid / f"img{i}.png")
        records.append(ImageRecord(file=f"img{i}.png", prompt="a photo of a <c> cat in <s> style", strategy=strategy,
                                   method="triu_deltaR", style_weight=1.0, content_weight=1.0, seed=seed))
    write_manifest(grid, records)
    for i in range(2):
        _noise_image(10 + i).save(style / f"s{i}.png")
        _noise_image(20 + i).save(content / f"c{i}.jpg")
    return grid, style, content


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_clip_prompt_removes_concept_tokens():
    assert clip_prompt("a photo of a <c> cat in <s> style", ["<c>", "<s>", "sks"]) == "a photo of a cat in style"
    assert clip_prompt("a sks dog, sksy", ["sks"]) == "a dog, sksy"


def test_scores_equal_hand_computed_cosines(scorers, image_set, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

    clip_dir, dino_dir = scorers
    grid, style, content = image_set
    out = tmp_path / "eval"
    evaluate_main(["--images", str(grid), "--style_refs", str(style), "--content_refs", str(content), "--clip_model",
                   str(clip_dir), "--dino_model", str(dino_dir), "--output_dir", str(out), "--device", "cpu",
                   "--eval_batch_size", "2"])
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 3

    # Hand computation, one image at a time, straight from the transformers models.
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    clip_proc, tok = AutoImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    dino, dino_proc = ViTModel.from_pretrained(dino_dir).eval(), AutoImageProcessor.from_pretrained(dino_dir)

    def clip_image(img):
        out = clip.get_image_features(pixel_values=clip_proc(images=img, return_tensors="pt")["pixel_values"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def dino_cls(img):
        return dino(pixel_values=dino_proc(images=img, return_tensors="pt")["pixel_values"]).last_hidden_state[:, 0]

    with torch.no_grad():
        tokens = tok(["a photo of a cat in style"], return_tensors="pt")
        text = clip.get_text_features(**tokens)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        style_refs = [Image.open(p).convert("RGB") for p in sorted(style.iterdir())]
        content_refs = [Image.open(p).convert("RGB") for p in sorted(content.iterdir())]
        for row in rows:
            img = Image.open(grid / row["file"]).convert("RGB")
            assert row["clip_prompt"] == "a photo of a cat in style"
            assert float(row["clip_t"]) == pytest.approx(_cos(clip_image(img), text), abs=1e-5)
            expected_style = np.mean([_cos(clip_image(img), clip_image(r)) for r in style_refs])
            assert float(row["clip_i_style"]) == pytest.approx(expected_style, abs=1e-5)
            expected_content = np.mean([_cos(dino_cls(img), dino_cls(r)) for r in content_refs])
            assert float(row["dino_content"]) == pytest.approx(expected_content, abs=1e-5)

    # Per-cell mean and standard error (sample std / sqrt(n)); a one-image cell has none.
    cells = {c["strategy"]: c for c in json.loads((out / "summary.json").read_text())}
    direct = [float(r["dino_content"]) for r in rows if r["strategy"] == "direct"]
    assert cells["direct"]["n"] == 2
    assert cells["direct"]["dino_content_mean"] == pytest.approx(np.mean(direct), abs=1e-9)
    assert cells["direct"]["dino_content_se"] == pytest.approx(abs(direct[0] - direct[1]) / 2, abs=1e-9)
    assert cells["klora"]["n"] == 1 and cells["klora"]["clip_t_se"] is None
    table = (out / "summary.md").read_text()
    assert "| direct | triu_deltaR | 1 | 1 | 2 |" in table and "±" in table
    assert Image.open(out / "tradeoff.png").size[0] > 100
    assert not any(isinstance(v, float) and math.isnan(v) for c in cells.values() for v in c.values())


def test_bad_input_one_line(scorers, image_set, tmp_path, capsys):
    clip_dir, dino_dir = scorers
    grid, style, content = image_set
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "notes.txt").write_text("not an image")
    base = ["--images", str(grid), "--style_refs", str(style), "--content_refs", str(content),
            "--clip_model", str(clip_dir), "--dino_model", str(dino_dir), "--device", "cpu"]
    cases = {
        "--clip_model": ["--clip_model", str(tmp_path / "missing_clip")],
        "has no manifest.json": ["--images", str(empty)],
        "--style_refs": ["--style_refs", str(no_images)],
        "--content_refs": ["--content_refs", str(empty)],
    }
    for expected, override in cases.items():
        out = tmp_path / f"out_{len(expected)}"
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main([*base, *override, "--output_dir", str(out)])
        lines = error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(lines) == 1 and expected in lines[0], (expected, lines)
        assert not (out / "scores.csv").exists()


def test_compare_runs_every_strategy_end_to_end(tiny_sd3, scorers, image_set, tmp_path, capsys):
    """One command: every strategy (direct, ZipLoRA, K-LoRA, TIES, DARE) rendered, scored, tabulated and plotted on
    the tiny SD3 pipeline."""
    from qrlora.cli.compare import main as compare_main
    from qrlora.merging.strategies import STRATEGIES

    clip_dir, dino_dir = scorers
    _, style_refs, content_refs = image_set
    style = make_adapter(tiny_sd3, "sd3", tmp_path / "style.safetensors", seed=1)
    content = make_adapter(tiny_sd3, "sd3", tmp_path / "content.safetensors", method="lora", seed=2)
    out = tmp_path / "compare"
    compare_main(["--model_path", str(tiny_sd3), "--content_lora_path", str(content), "--style_lora_path", str(style),
                  "--content_refs", str(content_refs), "--style_refs", str(style_refs), "--seeds", "0,1",
                  "--content_prompt", "a photo of a <c> cat", "--style_prompt", "a landscape in <s> style",
                  "--ziplora_steps", "2", "--clip_model", str(clip_dir), "--dino_model", str(dino_dir),
                  "--output_dir", str(out), *RENDER])
    cells = json.loads((out / "summary.json").read_text())
    assert sorted(c["strategy"] for c in cells) == sorted(STRATEGIES) == ["dare", "direct", "klora", "ties", "ziplora"]
    assert all(c["n"] == 2 and c["method"] == "lora+triu_deltaR" and c["dino_content_se"] is not None for c in cells)
    assert (out / "tradeoff.png").is_file() and (out / "ziplora" / "ziplora_adapter.safetensors").is_file()
    # Strategies really differ: the same seed and weights give different images.
    direct = np.asarray(Image.open(out / "direct" / "s1.00_c1.00_seed0.png"), dtype=np.int16)
    klora = np.asarray(Image.open(out / "klora" / "s1.00_c1.00_seed0.png"), dtype=np.int16)
    assert np.abs(direct - klora).max() > 0
    # A second run into the same folder is refused, nothing replaced.
    before = (out / "summary.md").read_text()
    with pytest.raises(SystemExit):
        compare_main(["--model_path", str(tiny_sd3), "--content_lora_path", str(content), "--style_lora_path", str(style),
                      "--content_refs", str(content_refs), "--style_refs", str(style_refs), "--clip_model", str(clip_dir),
                      "--dino_model", str(dino_dir), "--output_dir", str(out)])
    assert "--output_dir" in error_lines(capsys.readouterr().err)[0]
    assert (out / "summary.md").read_text() == before


def test_wrapper_scores_a_merge_grid(tiny_sd3, scorers, image_set, tmp_path):
    """``bash test/evaluate_merge.sh cpu`` over the manifest the merge grid writes."""
    from qrlora.cli.merge import grid_main

    clip_dir, dino_dir = scorers
    _, style_refs, content_refs = image_set
    style = make_adapter(tiny_sd3, "sd3", tmp_path / "s.safetensors", seed=1)
    content = make_adapter(tiny_sd3, "sd3", tmp_path / "c.safetensors", seed=2)
    grid = tmp_path / "outputs_SD3" / "merge"  # where SD3_dir/inference.sh writes its grid
    grid_main(["--model_path", str(tiny_sd3), "--style_lora_path", str(style), "--content_lora_path", str(content),
               "--style_weights", "0,1", "--content_weights", "1", *RENDER, "--output_dir", str(grid)])
    out = tmp_path / "eval"
    # No IMAGES: the wrapper finds the newest merge grid under outputs_*/ of the folder it runs in.
    env = {**os.environ, "STYLE_REFS": str(style_refs), "CONTENT_REFS": str(content_refs), "CLIP_MODEL": str(clip_dir),
           "DINO_MODEL": str(dino_dir), "OUTPUT_DIR": str(out), "PYTHON": sys.executable}
    env.pop("IMAGES", None)
    proc = subprocess.run(["bash", str(REPO / "test" / "evaluate_merge.sh"), "cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMAGES (newest merge grid): outputs_SD3/merge" in proc.stderr
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    none = subprocess.run(["bash", str(REPO / "test" / "evaluate_merge.sh"), "cpu"], cwd=empty, env=env,
                          capture_output=True, text=True)
    assert none.returncode != 0 and [line for line in none.stderr.splitlines() if "no merge grid" in line]
    cells = json.loads((out / "summary.json").read_text())
    assert sorted((c["style_weight"], c["content_weight"]) for c in cells) == [(0.0, 1.0), (1.0, 1.0)]
    assert all(c["strategy"] == "direct" and "clip_t_mean" in c for c in cells)
