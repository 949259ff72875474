"""The merge explorer's session, without a browser (tests/test_ui_browser.py drives the page): the command it shows
parses back into exactly the settings it rendered with, paths are checked with one line each, the verdict reads as
the classifier saw it. Fast: no model loads."""
from __future__ import annotations

import shlex

import pytest

from qrlora.cli.arguments import settings_from
from qrlora.cli.merge import grid_parser, merge_parser
from qrlora.errors import UserError
from qrlora.files.checkpoint import ADAPTER_FILENAME
from qrlora.merging.settings import RenderSettings, StrategySettings
from qrlora.ui.session import MergeRequest, Verdict, adapter_file, grid_command, merge_command, preview


@pytest.fixture
def pair(tmp_path):
    for role in ("content", "style"):
        (tmp_path / role).mkdir()
        (tmp_path / role / ADAPTER_FILENAME).write_bytes(b"")  # only its existence is checked here
    return tmp_path / "content", tmp_path / "style"


def request(pair, **changes):
    render = RenderSettings(prompt="a heart in checker style", num_inference_steps=7, height=32, width=48, seed=3,
                            guidance_scale=2.5, max_sequence_length=8)
    settings = StrategySettings(merge_density=0.3, ties_majority_sign="frequency", klora_k=5)
    fields = dict(model_path="assets/world", content=str(pair[0]), style=str(pair[1]), strategy="ties",
                  content_weight=0.7, style_weight=-0.25, render=render, settings=settings)
    return MergeRequest(**{**fields, **changes})


def test_the_merge_command_is_the_screen(pair):
    req = request(pair)
    argv = shlex.split(merge_command(req, "out"))
    assert argv[:3] == ["python", "-m", "qrlora.merge"]
    args = merge_parser().parse_args(argv[3:])
    assert settings_from(RenderSettings, args) == req.render
    assert settings_from(StrategySettings, args) == req.settings
    assert args.adapters == [str(pair[0] / ADAPTER_FILENAME), str(pair[1] / ADAPTER_FILENAME)]  # content first
    assert args.weights == "0.7,-0.25" and args.merge_strategy == "ties" and args.model_path == "assets/world"
    saved = merge_parser().parse_args(shlex.split(merge_command(req, "out", save_merged="merged dir"))[3:])
    assert saved.save_merged == "merged dir" and saved.no_render


def test_the_grid_command_is_the_screen(pair):
    req = request(pair)
    argv = shlex.split(grid_command(req, [0.5, 1.0], [0.0, 1.25], "grid"))
    assert argv[0] == "qrlora-grid"
    args = grid_parser("grid").parse_args(argv[1:])
    assert settings_from(RenderSettings, args) == req.render and settings_from(StrategySettings, args) == req.settings
    assert (args.content_weights, args.style_weights) == ("0.5,1", "0,1.25")
    assert args.style_lora_path == str(pair[1] / ADAPTER_FILENAME)


def test_paths_are_checked_with_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        adapter_file(str(tmp_path / "gone"), "content")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UserError, match="not a finished run"):
        adapter_file(str(tmp_path / "empty_run"), "style")
    with pytest.raises(UserError, match="choose a run"):
        adapter_file("  ", "style")
    with pytest.raises(UserError, match="--merge_strategy"):
        MergeRequest("assets/world", "a", "b", strategy="average")


def test_the_verdict_says_what_the_classifier_saw():
    assert Verdict("heart", "checker", "heart", "checker").text() == \
        "content right (heart) · style right (checker) · both right"
    assert Verdict("circle", "checker", "heart", "checker").text() == \
        "content wrong (circle, wanted heart) · style right (checker) · not both"


def test_small_images_are_shown_upscaled_exactly():
    import numpy as np
    from PIL import Image

    small = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    big = np.asarray(preview(small))
    assert big.shape == (256, 256, 3) and np.array_equal(big[::8, ::8], np.asarray(small))
