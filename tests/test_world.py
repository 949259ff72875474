"""The shipped CPU world (assets/world): learning and disentanglement as classifier numbers.

Every learning test trains through the real trainer (``qrlora.cli.train.main`` in-process, as the experiment does),
samples through the real ``StableDiffusion3Pipeline`` with the real merge code (``qrlora.merging.inference.MergedPipeline``,
direct strategy), seeds 0..N-1, and reads the world's classifier. A test passes only if the adapter moved the rate
of the new attribute well above what the base model gives for the same prompt and seeds: an adapter that learned
nothing leaves the base model bit-identical (zero-initialised coefficients), so it scores exactly the base rate,
which every threshold below excludes by a stated margin (checked in each test).

Thresholds come from ``bench/world_thresholds.py`` (5 seeds: adapter seed = instance-image seed; the numbers are
in docs/world.md, "Tests"): each floor sits well below the lowest rate measured over the seeds.
Only seed 0 runs here; the floors leave room for the seed-to-seed spread measured there.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import error_lines, run_script
from qrlora.cli.world_runs import render_settings, train_adapter
from qrlora.toy.world import data
from qrlora.toy.world.experiment import Sampler
from qrlora.toy.world.world import CONTENT_STYLE, SHIPPED_WORLD, STYLE_SHAPE, load_world

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`

# Per method: trainer steps and learning rate (rank 4, batch 4, the 4 instance images, seed 0). triu_deltaR trains
# r x in coefficients (half masked) and learns the style more slowly than LoRA at the same rate: 80 steps, not 40.
SETTINGS = {"triu_deltaR": (80, 1e-2), "lora": (40, 1e-2)}
SAMPLES = 32  # images per measurement, seeds 0..31
# Floors, from bench/world_thresholds.py over 5 seeds (docs/world.md), well below the
# lowest rate measured; the base model scores 0% (content, style) and 3% / 0% (merge) on the same prompts and seeds.
CONTENT_FLOOR = 0.6  # held-out shape rate, content adapter alone, its own prompt (measured: 100% every seed, both methods)
STYLE_FLOOR = 0.5  # held-out style rate, style adapter alone, its own prompt (measured min: triu_deltaR 88%, lora 100%)
# The (1, 1) direct merge on "a heart in checker style", LoRA pairs (measured min: shape 53%, style 91%).
# QR-LoRA (triu_deltaR) pairs keep the shape far less in this world (0-56%, mean 21% over the same seeds):
# the experiment table of docs/world.md reports it, and no floor is claimed for them.
MERGE_CONTENT_FLOOR = 0.3
MERGE_STYLE_FLOOR = 0.6
MARGIN = 0.25  # every floor must exceed the base model's rate on the same prompt and seeds by this much


@pytest.fixture(scope="module")
def world():
    return load_world(SHIPPED_WORLD)


_SAMPLERS: dict = {}


@pytest.fixture(scope="module")
def samplers(world, tmp_path_factory):
    """Per method, lazily: the content and style adapters (seed 0) trained once, merged by the real merge route
    (a ``MergedPipeline``, direct strategy) whose weights each measurement sets."""
    from qrlora.files.checkpoint import load_adapter
    from qrlora.merging.inference import MergedPipeline

    def get(method):
        if method not in _SAMPLERS:
            steps, lr = SETTINGS[method]
            root = tmp_path_factory.mktemp(f"world_{method}")
            paths = [train_adapter(world, method, role, root / role, steps=steps, lr=lr, seed=0)
                     for role in ("content", "style")]
            merged = MergedPipeline(str(world.path), [load_adapter(p) for p in paths], None, render_settings(world),
                                    strategy="direct", roles=(0, 1))
            _SAMPLERS[method] = Sampler(world, merged, SAMPLES)
        return _SAMPLERS[method]

    yield get
    _SAMPLERS.clear()


def rate(world, sampler, weights, shape, style, key):
    return world.rates(sampler.images(weights, [data.caption(shape, style)]), shape, style)[key]


def test_the_shipped_world_meets_the_issue_bars(world):
    record = world.record
    assert record["classifier"]["shape_accuracy"] >= 0.95 and record["classifier"]["style_accuracy"] >= 0.95
    assert record["base_model"]["seen_shape_accuracy"] >= 0.80 and record["base_model"]["seen_style_accuracy"] >= 0.80
    assert world.new_shape not in data.SEEN_SHAPES and world.new_style not in data.SEEN_STYLES
    size = sum(f.stat().st_size for f in world.path.rglob("*") if f.is_file())
    assert size < 15 * 2**20, f"the shipped world grew to {size / 2**20:.1f} MiB"


def test_the_larger_world_meets_the_bars_and_keeps_the_flux_rank_ratio():
    """assets/world_w256 (width 256, 6 blocks, half-precision weights): the study's scale check (docs/world.md)."""
    from qrlora.toy.world.world import SHIPPED_WORLD, load_world

    large = load_world(SHIPPED_WORLD.parent / "world_w256")
    record = large.record
    assert (record["settings"]["width"], record["settings"]["layers"], record["settings"]["save_dtype"]) == (256, 6, "float16")
    assert record["classifier"]["shape_accuracy"] >= 0.95 and record["base_model"]["seen_style_accuracy"] >= 0.80
    assert large.flux_ratio_rank == round(256 * 64 / 3072) == 5
    size = sum(f.stat().st_size for f in large.path.rglob("*") if f.is_file())
    assert size < 40 * 2**20, f"the larger world grew to {size / 2**20:.1f} MiB"
    import json

    weights = json.loads((large.path / "transformer" / "config.json").read_text())
    assert weights["num_layers"] == 6


def test_the_classifier_reads_fresh_renders(world):
    pairs = data.balanced_pairs(data.SHAPES, data.STYLES, 4)
    shapes, styles = world.classify(data.render_set(pairs, base_seed=987_654))  # seeds no build used
    assert np.mean([p == s for p, (s, _) in zip(shapes, pairs)]) >= 0.95
    assert np.mean([p == t for p, (_, t) in zip(styles, pairs)]) >= 0.95


def test_renders_are_a_function_of_the_seed():
    assert np.array_equal(data.render("star", "dots", 7), data.render("star", "dots", 7))
    assert not np.array_equal(data.render("star", "dots", 7), data.render("star", "dots", 8))


@pytest.mark.parametrize("method", list(SETTINGS))
def test_the_content_adapter_learns_the_new_shape(world, samplers, method):
    sampler = samplers(method)
    base = rate(world, sampler, (0.0, 0.0), world.new_shape, CONTENT_STYLE, "shape")
    learned = rate(world, sampler, (1.0, 0.0), world.new_shape, CONTENT_STYLE, "shape")
    assert CONTENT_FLOOR >= base + MARGIN, f"the floor no longer excludes the base rate {base:.2f}: re-measure"
    assert learned >= CONTENT_FLOOR, f"held-out shape rate {learned:.2f} (base {base:.2f}) is below {CONTENT_FLOOR}"


@pytest.mark.parametrize("method", list(SETTINGS))
def test_the_style_adapter_learns_the_new_style(world, samplers, method):
    sampler = samplers(method)
    base = rate(world, sampler, (0.0, 0.0), STYLE_SHAPE, world.new_style, "style")
    learned = rate(world, sampler, (0.0, 1.0), STYLE_SHAPE, world.new_style, "style")
    assert STYLE_FLOOR >= base + MARGIN, f"the floor no longer excludes the base rate {base:.2f}: re-measure"
    assert learned >= STYLE_FLOOR, f"held-out style rate {learned:.2f} (base {base:.2f}) is below {STYLE_FLOOR}"


def test_the_lora_merge_at_one_one_keeps_both(world, samplers):
    sampler = samplers("lora")
    images = sampler.images((0.0, 0.0), [data.caption(world.new_shape, world.new_style)])
    base = world.rates(images, world.new_shape, world.new_style)
    merged = world.rates(sampler.images((1.0, 1.0), [data.caption(world.new_shape, world.new_style)]),
                         world.new_shape, world.new_style)
    assert MERGE_CONTENT_FLOOR >= base["shape"] + MARGIN and MERGE_STYLE_FLOOR >= base["style"] + MARGIN, base
    assert merged["shape"] >= MERGE_CONTENT_FLOOR and merged["style"] >= MERGE_STYLE_FLOOR, (merged, base)


def test_bad_input_is_one_line(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    for args in (["build", "--output", str(busy)], ["build", "--output", str(tmp_path / "w"), "--width", "100"],
                 ["experiment", "--output", str(tmp_path / "e"), "--methods", "qr,nope"],
                 ["experiment", "--output", str(tmp_path / "e"), "--world", str(busy)]):
        proc = run_script([sys.executable, "-m", "qrlora.world", *args], check=False)
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_a_world_build_is_byte_identical_on_rebuild(tmp_path):
    """Seeded build: two builds of a small world give the same bytes in every weight, tokenizer and config file;
    only the record's command line (its output folder) and wall times differ."""
    import hashlib
    import json

    flags = ["--vae_steps", "3", "--denoiser_steps", "3", "--classifier_steps", "3", "--width", "32", "--layers", "1",
             "--samples_per_pair", "1", "--save_dtype", "float16"]
    for name in ("a", "b"):
        run_script([sys.executable, "-m", "qrlora.world", "build", "--output", str(tmp_path / name), *flags])

    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("world.json", "README.md")}

    a, b = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert len(a) > 10 and a == b
    records = [json.loads((tmp_path / n / "world.json").read_text()) for n in ("a", "b")]
    for record in records:
        del record["command"], record["timings"]
    assert records[0] == records[1]
