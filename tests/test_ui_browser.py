"""The merge explorer in a real browser: ``python -m qrlora.ui`` serving on 127.0.0.1, headless Chromium (Debian's
chromium + chromium-driver, driven by selenium) choosing two world adapters from the discovered runs, rendering,
reading the classifier's verdict, moving a weight, rendering a grid, saving the merge; the command the page shows
reproduces its image; a missing run folder, adapters of two backbones and a NaN adapter each show one line on the
page and the server keeps serving. The page's screenshot is kept in ``artefacts/`` (git-ignored)."""
from __future__ import annotations

import shlex
import subprocess

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.explorer import Page, browser, free_port, pixels, start_explorer, stop, train_world_pair
from qrlora.files.checkpoint import ADAPTER_FILENAME

pytestmark = pytest.mark.slow  # trains a world pair and drives a browser: about 1.5 minutes on 2 cores
ARTEFACTS = REPO / "artefacts"


def relabelled(src, dst, **metadata):
    """A copy of an adapter file with some metadata changed (another backbone, say)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as handle:
        meta = {**handle.metadata(), **metadata}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


def with_nan(src, dst):
    tensors = load_file(str(src))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as handle:
        meta = handle.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_the_explorer_merges_world_adapters_in_a_browser(tmp_path):
    runs = train_world_pair(tmp_path)
    port = free_port()
    server = start_explorer([tmp_path], tmp_path, port)
    driver = None
    try:
        driver = browser()
        page = Page(driver, f"http://127.0.0.1:{port}/")
        page.choose_world_pair()
        assert page.value("content_path") == str(runs["content"]) and page.value("style_path") == str(runs["style"])

        both = page.press_and_wait_for_image()
        page.wait.until(lambda d: "world classifier" in page.text("verdict"))
        verdict_both = page.text("verdict")
        assert "content right (heart)" in verdict_both or "content wrong" in verdict_both
        command = page.value("command")
        assert command.startswith("python -m qrlora.merge ") and "--weights 1,1" in command
        assert page.image_source("heatmap")  # the pair's similarity heatmap is drawn

        # The command on the page makes the image on the page (the page shows it upscaled, nearest).
        subprocess.run(shlex.split(command), cwd=tmp_path, check=True, capture_output=True)
        written = Image.open(next((tmp_path / "explorer_output").glob("merged_*.png"))).convert("RGB")
        factor = pixels(both).shape[0] // written.height
        assert np.array_equal(pixels(both)[::factor, ::factor], np.asarray(written))

        page.type_into("style_weight", "0")
        no_style = page.press_and_wait_for_image()
        assert not np.array_equal(pixels(both), pixels(no_style)), "the image did not change with the style weight"
        page.wait.until(lambda d: page.text("verdict") != verdict_both or "--weights 1,0" in page.value("command"))
        assert "--weights 1,0" in page.value("command") and "world classifier" in page.text("verdict")
        ARTEFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTEFACTS / "explorer_browser_test.png"))

        page.type_into("grid_weights", "0,1")
        grid = page.press_and_wait_for_image("render_grid", "grid_image")
        assert pixels(grid).shape[1] > pixels(no_style).shape[1]  # two columns of cells and the axis labels
        page.wait.until(lambda d: "cells of the grid" in page.text("verdict"))
        assert "of 4" in page.text("verdict") or "/4 cells" in page.text("verdict")
        assert page.value("command").startswith("qrlora-grid ")

        saved = tmp_path / "merged_denoiser"
        page.type_into("save_dir", str(saved))
        page.find("#save").click()
        page.wait.until(lambda d: "saved the merged denoiser" in page.text("saved") or page.text("error"))
        assert not page.text("error") and (saved / "config.json").is_file()
        assert "--save_merged" in page.value("command")
        from diffusers import SD3Transformer2DModel

        from qrlora.toy.world.world import SHIPPED_WORLD
        merged = SD3Transformer2DModel.from_pretrained(saved).state_dict()
        base = SD3Transformer2DModel.from_pretrained(SHIPPED_WORLD, subfolder="transformer").state_dict()
        changed = [k for k in base if not torch.equal(merged[k], base[k])]
        assert changed and all(".attn." in k for k in changed)  # the content adapter folded into its layers

        # Mistakes: one line on the page, never a traceback, and the server goes on serving.
        page.type_into("content_path", str(tmp_path / "no_such_run"))
        assert "does not exist" in page.press_and_wait_for_error()
        flux = relabelled(runs["content"] / ADAPTER_FILENAME, tmp_path / "flux" / ADAPTER_FILENAME, backbone="flux")
        page.type_into("content_path", str(flux))
        message = page.press_and_wait_for_error()
        assert "flux" in message and "sd3" in message, message
        page.type_into("content_path", str(with_nan(runs["content"] / ADAPTER_FILENAME, tmp_path / "nan" / ADAPTER_FILENAME)))
        message = page.press_and_wait_for_error()
        assert "nan" in message.lower() or "finite" in message.lower(), message
        assert "Traceback" not in driver.page_source
        page.type_into("content_path", str(runs["content"]))
        page.press_and_wait_for_image()
        assert page.text("error") == "" and server.poll() is None
    finally:
        if driver is not None:
            driver.quit()
        log = stop(server)
    assert "Traceback" not in log, log[-3000:]
