"""The merge explorer's web page (gradio): the controls, and handlers that turn them into a ``MergeRequest`` and
call ``qrlora.ui.session``. A user mistake (a missing run folder, adapters of two backbones, a NaN adapter, a bad
value) is shown on the page as the one line the CLIs print; anything else is one line too, with the traceback in
the server's log; either way the server keeps serving."""
from __future__ import annotations

import functools
import logging
import tempfile
import traceback
from pathlib import Path

import gradio as gr

from ..errors import UserError, describe_os_error
from ..merging.inference import parse_weights
from ..merging.settings import RenderSettings, StrategySettings
from ..merging.strategies import STRATEGIES
from ..toy.world.world import SHIPPED_WORLD
from .session import Explorer, MergeRequest, grid_command, merge_command, preview, similarity_heatmap, verdicts, world_of

LOG = logging.getLogger("qrlora.ui")
WORLD_PRESET = "the CPU world (assets/world)"
TINY_PRESETS = {f"tiny {name.upper()} (random, built offline)": name for name in ("sd3", "flux", "sdxl")}
OTHER_PRESET = "a hub id or pipeline folder (type it)"
OUTPUT_DIR = "explorer_output"  # the output folder the reproducing command names


def error_text(err: BaseException) -> str:
    """The one line a user sees for a failure (the CLIs' ``error: ...``)."""
    if isinstance(err, UserError):
        return f"error: {err}"
    if isinstance(err, OSError):
        return f"error: {describe_os_error(err)}"
    return f"error: {type(err).__name__}: {err} (an internal error; the server log has the traceback)"


def shown_errors(outputs: int):
    """Wrap a handler whose last output is the error box: a failure empties nothing, it fills the error box."""
    def wrap(handler):
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return (*handler(*args, **kwargs), "")
            except Exception as err:  # the page must say what went wrong and the server keep serving
                if not isinstance(err, (UserError, OSError)):
                    LOG.error("explorer: %s", traceback.format_exc())
                return (*[gr.update() for _ in range(outputs)], error_text(err))
        return run
    return wrap


def _optional(value):
    """A number box left at 0 or empty means "the pipeline's default" (None)."""
    return None if value in (None, "", 0) else value


def build_request(model_path, content, style, strategy, content_weight, style_weight, prompt, seed, steps, height,
                  width, guidance, max_sequence_length, density, majority, klora_k, klora_alpha, klora_beta,
                  ziplora_steps, ziplora_lr, ziplora_lambda) -> MergeRequest:
    """The page's values as a typed, checked request (the settings refuse a bad value naming its flag)."""
    render = RenderSettings(prompt=prompt, seed=int(seed), num_inference_steps=int(steps), height=int(height),
                            width=int(width), guidance_scale=_optional(guidance),
                            max_sequence_length=None if not max_sequence_length else int(max_sequence_length))
    settings = StrategySettings(merge_density=float(density), ties_majority_sign=majority, klora_k=int(klora_k),
                                klora_alpha=float(klora_alpha), klora_beta=float(klora_beta),
                                ziplora_steps=int(ziplora_steps), ziplora_lr=float(ziplora_lr),
                                ziplora_lambda=float(ziplora_lambda))
    return MergeRequest(str(model_path).strip(), str(content).strip(), str(style).strip(), strategy,
                        float(content_weight), float(style_weight), render, settings)


def build_app(explorer: Explorer, tiny_dir: Path) -> gr.Blocks:
    """The explorer's page, wired to ``explorer``; tiny pipelines are built into ``tiny_dir`` when chosen."""

    def run_choices():
        runs = explorer.runs()
        labels = [(f"{r.folder.name} ({r.backbone} {r.method} r{r.rank})", str(r.folder)) for r in runs]
        return ([c for c, r in zip(labels, runs) if r.task == "content"],
                [c for c, r in zip(labels, runs) if r.task == "style"])

    def refresh():
        content, style = run_choices()
        note = f"{len(content)} content and {len(style)} style runs under " + ", ".join(explorer.roots) + "/exps_*"
        return gr.update(choices=content, value=None), gr.update(choices=style, value=None), note

    def pick_preset(preset):
        """A base-model preset fills the model path and the render settings that suit it."""
        if preset == WORLD_PRESET:
            return str(SHIPPED_WORLD), 32, 32, 20, 4.0, 8, "a heart in checker style"
        if preset in TINY_PRESETS:
            from ..toy.tiny import build_tiny_pipeline, holds_pipeline

            name = TINY_PRESETS[preset]
            path = tiny_dir / f"tiny_{name}"
            if not holds_pipeline(path, name, 0):
                build_tiny_pipeline(name, path, seed=0)
            return str(path), 64, 64, 4, 0, 0, "a photo of sks cat"
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update()

    with gr.Blocks(title="QR-LoRA merge explorer") as app:
        gr.Markdown("# QR-LoRA merge explorer\nPick a content and a style adapter, a base model and a merge; "
                    "render one image or a weight grid. Every merge runs through the same library as "
                    "`python -m qrlora.merge`, and the command that reproduces the screen is shown below it.")
        error = gr.Markdown(elem_id="error")
        with gr.Row():
            with gr.Column():
                preset = gr.Radio([WORLD_PRESET, *TINY_PRESETS, OTHER_PRESET], label="base model", elem_id="preset")
                model_path = gr.Textbox(label="base model path or hub id", elem_id="model_path")
                roots = gr.Markdown(elem_id="runs_note")
                refresh_button = gr.Button("find runs", elem_id="refresh")
                content_runs, style_runs = run_choices()
                content_run = gr.Radio(content_runs, label="content run", elem_id="content_run")
                content = gr.Textbox(label="content adapter (file or run folder; or pick a run above)", elem_id="content_path")
                style_run = gr.Radio(style_runs, label="style run", elem_id="style_run")
                style = gr.Textbox(label="style adapter (file or run folder; or pick a run above)", elem_id="style_path")
            with gr.Column():
                strategy = gr.Radio(list(STRATEGIES), value="direct", label="merge strategy", elem_id="strategy")
                content_weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="content weight", elem_id="content_weight")
                style_weight = gr.Slider(-1, 2, value=1.0, step=0.05, label="style weight", elem_id="style_weight")
                with gr.Accordion("strategy parameters", open=False):
                    defaults = StrategySettings()
                    density = gr.Slider(0.05, 1, value=defaults.merge_density, step=0.05, label="TIES / DARE density")
                    majority = gr.Radio(["total", "frequency"], value=defaults.ties_majority_sign, label="TIES majority sign")
                    klora_k = gr.Number(defaults.klora_k, label="K-LoRA K", precision=0)
                    klora_alpha = gr.Number(defaults.klora_alpha, label="K-LoRA alpha")
                    klora_beta = gr.Number(defaults.klora_beta, label="K-LoRA beta")
                    ziplora_steps = gr.Number(defaults.ziplora_steps, label="ZipLoRA steps", precision=0)
                    ziplora_lr = gr.Number(defaults.ziplora_lr, label="ZipLoRA learning rate")
                    ziplora_lambda = gr.Number(defaults.ziplora_lambda, label="ZipLoRA lambda")
                prompt = gr.Textbox("a heart in checker style", label="prompt", elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                    steps = gr.Number(20, label="steps", precision=0, elem_id="steps")
                    guidance = gr.Number(4.0, label="guidance (0: the pipeline's)")
                with gr.Row():
                    height = gr.Number(32, label="height", precision=0)
                    width = gr.Number(32, label="width", precision=0)
                    max_sequence_length = gr.Number(8, label="T5 length (0: the pipeline's)", precision=0)
                with gr.Row():
                    render_button = gr.Button("render", variant="primary", elem_id="render")
                    grid_weights = gr.Textbox("0.5,0.75,1", label="grid weights (both axes)", elem_id="grid_weights")
                    grid_button = gr.Button("render grid", elem_id="render_grid")
        with gr.Row():
            image = gr.Image(label="merged", type="pil", elem_id="merged_image", format="png", interactive=False)
            with gr.Column():
                verdict = gr.Markdown(elem_id="verdict")
                heatmap = gr.Image(label="similarity of the pair's dW per layer", type="pil", interactive=False,
                                   elem_id="heatmap")
        grid = gr.Image(label="weight grid (rows: content, columns: style)", type="pil", interactive=False,
                        elem_id="grid_image", format="png")
        command = gr.Textbox(label="the command that reproduces this", elem_id="command", interactive=False)
        with gr.Row():
            save_dir = gr.Textbox("explorer_output/merged_denoiser", label="save the merged denoiser into (diffusers layout)",
                                  elem_id="save_dir")
            save_button = gr.Button("save merged", elem_id="save")
        saved = gr.Markdown(elem_id="saved")

        inputs = [model_path, content, style, strategy, content_weight, style_weight, prompt, seed, steps, height,
                  width, guidance, max_sequence_length, density, majority, klora_k, klora_alpha, klora_beta,
                  ziplora_steps, ziplora_lr, ziplora_lambda]

        @shown_errors(4)
        def on_render(*values):
            request = build_request(*values)
            picture = explorer.render(request)
            world = world_of(request.model_path)
            said = ("" if world is None else
                    "**world classifier:** " + verdicts(world, [picture])[0].text())
            try:  # a pair the similarity is not defined for (two ranks, two methods) still renders
                heat = similarity_heatmap(*explorer.adapters(request))
            except UserError as err:
                heat, said = None, f"{said}\n\nno similarity heatmap: {err}".strip()
            return preview(picture), said, heat, merge_command(request, OUTPUT_DIR)

        @shown_errors(3)
        def on_grid(weights_text, *values, progress=gr.Progress()):
            request = build_request(*values)
            weights = parse_weights(weights_text, "grid weights")
            progress((0, len(weights) ** 2), desc="rendering the grid")
            images = explorer.render_grid(request, weights, weights,
                                          lambda done, total: progress((done, total), desc="rendering the grid"))
            world = world_of(request.model_path)
            said = ""
            if world is not None:
                keys = list(images)
                right = sum(v.content_right and v.style_right for v in verdicts(world, [images[k] for k in keys]))
                said = f"**world classifier:** both right in {right}/{len(keys)} cells of the grid"
            return (Explorer.grid_image(images, weights, weights), said,
                    grid_command(request, weights, weights, OUTPUT_DIR))

        @shown_errors(2)
        def on_save(folder, *values):
            request = build_request(*values)
            path = explorer.save_merged(request, folder)
            return f"saved the merged denoiser to `{path}`", merge_command(request, OUTPUT_DIR, save_merged=folder)

        @shown_errors(7)
        def on_preset(choice):
            return pick_preset(choice)

        preset.change(on_preset, preset, [model_path, height, width, steps, guidance, max_sequence_length, prompt, error])
        refresh_button.click(shown_errors(3)(refresh), None, [content_run, style_run, roots, error])
        content_run.change(lambda v: v or gr.update(), content_run, content)
        style_run.change(lambda v: v or gr.update(), style_run, style)
        render_button.click(on_render, inputs, [image, verdict, heatmap, command, error])
        grid_button.click(on_grid, [grid_weights, *inputs], [grid, verdict, command, error])
        save_button.click(on_save, [save_dir, *inputs], [saved, command, error])
    return app


def serve(roots: list[str], host: str = "127.0.0.1", port: int = 7860, tiny_dir: str | None = None,
          ready=None) -> None:
    """Build the page and serve it until interrupted; ``ready(url)`` is called once it answers."""
    folder = Path(tiny_dir) if tiny_dir else Path(tempfile.mkdtemp(prefix="qrlora-ui-tiny-"))
    app = build_app(Explorer(roots), folder)
    app.queue(default_concurrency_limit=1)  # one render at a time: the pipeline is shared
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                           footer_links=[], ssr_mode=False)
    print(f"merge explorer at {url or f'http://{host}:{port}/'} (Ctrl-C stops it)", flush=True)
    if ready:
        ready(url)
    app.block_thread()
