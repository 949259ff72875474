"""The merge explorer in a real browser: time from starting ``qrlora-ui`` to its first rendered world image, against
the peer a user has without it (``python -m qrlora.merge`` writing the same image), and the screenshot in docs/.

Both routes start a fresh process (``python -m qrlora.ui`` then headless Chromium, through Debian's chromium and
chromedriver, choosing the pair, pressing render and waiting for the image; ``python -m qrlora.merge`` with the
command the explorer shows) on the same world pair, trained first with the real trainer (LoRA, 40 steps: a pair
that merges, so the screenshot shows a verdict worth reading). The helpers here drive the page for the browser test
(``tests/test_ui_browser.py``) too.

    python -m bench.explorer --output bench/reports/explorer.json          # the timing (about 2 minutes on 2 cores)
    python -m bench.explorer --screenshot docs/explorer.png                # and the docs' screenshot
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

from . import _common as C

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium + chromium-driver
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_world_pair(root: Path, method: str = "lora", steps: int = 40) -> dict[str, Path]:
    """A content and a style run of the shipped world under ``root/exps_world/`` (named as the wrappers name runs,
    so run discovery offers them), trained by the real trainer; ``{role: run folder}``."""
    from qrlora.cli.world_runs import train_adapter
    from qrlora.toy.world.world import load_world

    world, runs = load_world(), {}
    for index, (role, trigger) in enumerate((("content", "c"), ("style", "s"))):
        adapter = train_adapter(world, method, role, root / f"train_{role}", steps=steps, lr=1e-2, seed=0)
        folder = root / "exps_world" / f"20260101-00000{index}-{trigger}-4-{method}-p1"
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(adapter).parent), folder)
        runs[role] = folder
    return runs


def start_explorer(roots: list[Path], cwd: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """``python -m qrlora.ui`` on 127.0.0.1:``port``, returned once the page answers."""
    proc = subprocess.Popen([sys.executable, "-m", "qrlora.ui", "--port", str(port), "--tiny_dir", str(cwd / "tiny"),
                             "--roots", *map(str, roots)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qrlora.ui exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"qrlora.ui did not answer on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> str:
    """Stop the server started here; its output."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def browser():
    """Headless Chromium through chromedriver (selenium; nothing is downloaded)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800",
                "--disable-gpu"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)


class Page:
    """The explorer's page in a browser, by the elements' ids."""

    def __init__(self, driver, url: str, timeout: float = 90):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.wait = driver, WebDriverWait(driver, timeout)
        driver.get(url)
        self.wait.until(lambda d: d.find_elements("css selector", "#render"))

    def find(self, selector: str):
        return self.driver.find_element("css selector", selector)

    def choose(self, group: str, text: str) -> None:
        """Click the radio option of ``#group`` whose label contains ``text``."""
        for label in self.driver.find_elements("css selector", f"#{group} label"):
            if text in label.text:
                label.click()
                return
        raise AssertionError(f"#{group}: no option containing {text!r}")

    def type_into(self, element_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{element_id} textarea, #{element_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text, Keys.TAB)

    def value(self, element_id: str) -> str:
        return self.find(f"#{element_id} textarea, #{element_id} input").get_attribute("value")

    def text(self, element_id: str) -> str:
        return self.find(f"#{element_id}").text

    def image_source(self, element_id: str = "merged_image") -> str | None:
        found = self.driver.find_elements("css selector", f"#{element_id} img")
        return found[0].get_attribute("src") if found else None

    def press_and_wait_for_image(self, button: str = "render", element_id: str = "merged_image") -> bytes:
        """Press ``button`` and wait until ``element_id`` shows a new image (or, after an error, the error box
        empties: the same image again has the same address); its PNG bytes. A new error fails."""
        before, error_before = self.image_source(element_id), self.text("error")
        self.find(f"#{button}").click()

        def done(_):
            said = self.text("error")
            if said.startswith("error:") and said != error_before:
                return True
            return self.image_source(element_id) not in (None, before) or (bool(error_before) and said == "")

        self.wait.until(done)
        if self.text("error").startswith("error:"):
            raise AssertionError(f"the page says: {self.text('error')}")
        with urllib.request.urlopen(self.image_source(element_id), timeout=30) as response:
            return response.read()

    def press_and_wait_for_error(self, button: str = "render") -> str:
        """Press ``button`` and wait for a new error line (one that differs from the one shown before)."""
        before = self.text("error")
        self.find(f"#{button}").click()
        self.wait.until(lambda d: self.text("error").startswith("error:") and self.text("error") != before)
        return self.text("error")

    def choose_world_pair(self) -> None:
        self.choose("preset", "CPU world")
        self.wait.until(lambda d: self.value("model_path").endswith("world"))
        self.choose("content_run", "-c-")
        self.choose("style_run", "-s-")
        self.wait.until(lambda d: self.value("content_path") and self.value("style_path"))


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(BytesIO(png)).convert("RGB"))


def measure(root: Path, screenshot: Path | None) -> dict:
    """Seconds from ``python -m qrlora.ui`` starting to the first world image on the page, and from
    ``python -m qrlora.merge`` starting to the same merge's image on disk."""
    train_world_pair(root)
    port, driver = free_port(), None
    start = time.perf_counter()
    server = start_explorer([root], root, port)
    try:
        driver = browser()
        page = Page(driver, f"http://127.0.0.1:{port}/")
        page.choose_world_pair()
        page.press_and_wait_for_image()
        ui_seconds = time.perf_counter() - start
        page.wait.until(lambda d: "world classifier" in page.text("verdict"))
        command, verdict = page.value("command"), page.text("verdict")
        if screenshot:
            page.driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(screenshot))
    finally:
        if driver is not None:
            driver.quit()
        stop(server)
    start = time.perf_counter()
    subprocess.run(shlex.split(command), cwd=root, check=True, capture_output=True)
    cli_seconds = time.perf_counter() - start
    return {"ui_start_to_first_world_image_s": ui_seconds, "cli_merge_same_image_s": cli_seconds,
            "ratio_ui_vs_cli": ui_seconds / cli_seconds, "command": command, "verdict": verdict}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(C.default_output("explorer")), help="JSON report path")
    p.add_argument("--screenshot", help="also save the page, after its first world render, as this PNG")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qrlora-explorer-") as tmp:
        result = measure(Path(tmp), Path(args.screenshot).resolve() if args.screenshot else None)
    print(f"qrlora-ui start -> first world image on the page: {result['ui_start_to_first_world_image_s']:.1f} s; "
          f"python -m qrlora.merge -> the same image on disk: {result['cli_merge_same_image_s']:.1f} s "
          f"({result['ratio_ui_vs_cli']:.2f}x)")
    print(f"verdict on the page: {result['verdict']}")
    C.write_json(args.output, {"machine": C.machine_info(), "load_average": C.load_average(),
                               "command": C.command_name(), **result})
    if args.screenshot:
        print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
