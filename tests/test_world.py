"""The shipped CPU world (assets/world): learning and disentanglement as classifier numbers.

Every learning test trains through the real trainer (``qrlora.train.main`` in-process, as the experiment does),
samples through the real ``StableDiffusion3Pipeline`` with the real merge code (``qrlora.inference.MergedPipeline``,
direct strategy), seeds 0..N-1, and reads the world's classifier. A test passes only if the adapter moved the rate
of the new attribute well above what the base model gives for the same prompt and seeds: an adapter that learned
nothing leaves the base model bit-identical (zero-initialised coefficients), so it scores exactly the base rate,
which every threshold below excludes by a stated margin (checked in each test).

Thresholds come from ``bench/world_thresholds.py`` (5 seeds: adapter seed = instance-image seed; the numbers are
in assets/world/README.md, "Test thresholds"): each floor sits well below the lowest rate measured over the seeds.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import error_lines, run_script
from qrlora.world import data
from qrlora.world.experiment import Sampler, render_args, train_adapter
from qrlora.world.world import CONTENT_STYLE, SHIPPED_WORLD, STYLE_SHAPE, load_world

STEPS, LR = 40, 1e-2  # "a few dozen steps" (the trainer's flags; rank 4, batch 4, triu_deltaR)
SAMPLES = 32  # images per measurement, seeds 0..31
# Floors (module docstring; measured distributions in assets/world/README.md).
CONTENT_FLOOR = 0.5  # held-out shape rate of the content adapter alone on its own prompt
STYLE_FLOOR = 0.5  # held-out style rate of the style adapter alone on its own prompt
MERGE_CONTENT_FLOOR = 0.3  # held-out shape rate of the (1, 1) direct merge on "a heart in checker style"
MERGE_STYLE_FLOOR = 0.3  # held-out style rate of the same images
MARGIN = 0.25  # every floor must exceed the base model's rate on the same prompt by this much


@pytest.fixture(scope="module")
def world():
    return load_world(SHIPPED_WORLD)


@pytest.fixture(scope="module")
def adapters(world, tmp_path_factory):
    """One content and one style triu_deltaR adapter (seed 0), trained once for the module."""
    root = tmp_path_factory.mktemp("world_adapters")
    return {role: train_adapter(world, "triu_deltaR", role, root / role, steps=STEPS, lr=LR, seed=0)
            for role in ("content", "style")}


@pytest.fixture(scope="module")
def sampler(world, adapters):
    """The real merge route: a ``MergedPipeline`` holding both adapters (direct strategy), weights set per call."""
    from qrlora.checkpoint import load_adapter
    from qrlora.inference import MergedPipeline

    loaded = [load_adapter(adapters["content"]), load_adapter(adapters["style"])]
    merged = MergedPipeline(str(world.path), loaded, None, render_args(world), strategy="direct", roles=(0, 1))
    return Sampler(world, merged, SAMPLES)


def rate(world, sampler, weights, shape, style, key):
    return world.rates(sampler.images(weights, [data.caption(shape, style)]), shape, style)[key]


def test_the_shipped_world_meets_the_issue_bars(world):
    record = world.record
    assert record["classifier"]["shape_accuracy"] >= 0.95 and record["classifier"]["style_accuracy"] >= 0.95
    assert record["base_model"]["seen_shape_accuracy"] >= 0.80 and record["base_model"]["seen_style_accuracy"] >= 0.80
    assert world.new_shape not in data.SEEN_SHAPES and world.new_style not in data.SEEN_STYLES
    size = sum(f.stat().st_size for f in world.path.rglob("*") if f.is_file())
    assert size < 15 * 2**20, f"the shipped world grew to {size / 2**20:.1f} MiB"


def test_the_classifier_reads_fresh_renders(world):
    pairs = data.balanced_pairs(data.SHAPES, data.STYLES, 4)
    shapes, styles = world.classify(data.render_set(pairs, base_seed=987_654))  # seeds no build used
    assert np.mean([p == s for p, (s, _) in zip(shapes, pairs)]) >= 0.95
    assert np.mean([p == t for p, (_, t) in zip(styles, pairs)]) >= 0.95


def test_renders_are_a_function_of_the_seed():
    assert np.array_equal(data.render("star", "dots", 7), data.render("star", "dots", 7))
    assert not np.array_equal(data.render("star", "dots", 7), data.render("star", "dots", 8))


def test_the_content_adapter_learns_the_new_shape(world, sampler):
    base = rate(world, sampler, (0.0, 0.0), world.new_shape, CONTENT_STYLE, "shape")
    learned = rate(world, sampler, (1.0, 0.0), world.new_shape, CONTENT_STYLE, "shape")
    assert CONTENT_FLOOR >= base + MARGIN, f"the floor no longer excludes the base rate {base:.2f}: re-measure"
    assert learned >= CONTENT_FLOOR, f"held-out shape rate {learned:.2f} (base {base:.2f}) is below {CONTENT_FLOOR}"


def test_the_style_adapter_learns_the_new_style(world, sampler):
    base = rate(world, sampler, (0.0, 0.0), STYLE_SHAPE, world.new_style, "style")
    learned = rate(world, sampler, (0.0, 1.0), STYLE_SHAPE, world.new_style, "style")
    assert STYLE_FLOOR >= base + MARGIN, f"the floor no longer excludes the base rate {base:.2f}: re-measure"
    assert learned >= STYLE_FLOOR, f"held-out style rate {learned:.2f} (base {base:.2f}) is below {STYLE_FLOOR}"


def test_the_merge_at_one_one_keeps_both(world, sampler):
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
