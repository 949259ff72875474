"""CLI of the CPU world (``python -m qrlora.world`` / ``qrlora-world``): ``build``, ``experiment``, ``images``, ``score``
(README.md, "The CPU world").

The experiment drives the real trainer and merge commands (their flags, parsed here), so its orchestration lives in
the CLI layer; what it measures (``Sampler``, the tables and plot) is library code in ``qrlora.toy.world.experiment``."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from ..files.checkpoint import load_adapter
from ..errors import UserError, cli_entry
from ..core.methods import get_method
from ..merging.strategies import STRATEGIES
from ..toy.world import data
from ..toy.world.experiment import LR_FACTOR, Sampler, dw_similarity, markdown, plot
from ..toy.world.study import QUICK
from ..toy.world.world import SAMPLE_GUIDANCE, SAMPLE_STEPS
from ..toy.world.world import World, write_instance_images
from .arguments import ArgumentParser, number_list, positive, report_name, seed, seed_list
from .world_runs import render_settings, train_adapter

EXPERIMENT_STEPS = 100  # trainer steps per adapter (a sweep on the shipped world: docs/world.md)
EXPERIMENT_LR = 1e-2


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m qrlora.world", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the world's VAE, denoiser and classifier from scratch (seeded)")
    b.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    b.add_argument("--seed", type=seed, default=0, help="seed of the data, the initial weights and training")
    b.add_argument("--vae_steps", type=positive(int), default=1200, help="training steps of the VAE")
    b.add_argument("--denoiser_steps", type=positive(int), default=4000, help="training steps of the denoiser")
    b.add_argument("--classifier_steps", type=positive(int), default=800, help="training steps of the classifier")
    b.add_argument("--width", type=int, default=128, help="transformer width (a multiple of 32)")
    b.add_argument("--layers", "--blocks", type=positive(int), default=4, help="transformer joint blocks (default 4)")
    b.add_argument("--save_dtype", choices=("float32", "float16"), default="float32",
                   help="precision of the stored transformer weights (float16 halves the folder; default float32)")
    b.add_argument("--batch_size", type=positive(int), default=64, help="images per training step")
    b.add_argument("--learning_rate", type=positive(float), default=1e-3, help="AdamW learning rate of the three trainings")
    b.add_argument("--threads", type=positive(int), default=1, help="torch threads per process (the classifier trains in a second one)")
    b.add_argument("--samples_per_pair", type=positive(int), default=4, help="base-model samples per seen (shape, style) pair")
    e = sub.add_parser("experiment", help="content + style adapters per method, merged per strategy, scored by the classifier")
    e.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    e.add_argument("--output", required=True, help="folder for the runs and results.json / .md / .png (must not exist or be empty)")
    e.add_argument("--methods", default="all", help="comma list of --lora_init_method names, or 'all' (default)")
    e.add_argument("--merges", default="all", help="comma list of merge strategies (direct, ziplora, klora), or 'all' (default)")
    e.add_argument("--weights", type=number_list, default="0.5,1.0", help="comma list: the grid is every (content, style) pair of these (default 0.5,1.0)")
    e.add_argument("--samples", type=positive(int), default=32, help="images per cell, seeds 0..N-1 (default 32)")
    e.add_argument("--steps", type=positive(int), default=EXPERIMENT_STEPS, help=f"trainer steps per adapter (default {EXPERIMENT_STEPS})")
    e.add_argument("--learning_rate", type=positive(float), default=EXPERIMENT_LR, help=f"trainer learning rate (default {EXPERIMENT_LR}; x10 for ica)")
    e.add_argument("--rank", type=positive(int), default=4, help="adapter rank of every method")
    e.add_argument("--seed", type=seed, default=0, help="training and sampling seed")
    i = sub.add_parser("images", help="render training images of one (shape, style) pair as PNGs (adapter data)")
    i.add_argument("--shape", required=True, choices=data.SHAPES, help="the shape the images show")
    i.add_argument("--style", required=True, choices=data.STYLES, help="the style the shape is filled in")
    i.add_argument("--count", type=positive(int), default=4, help="how many images to render")
    i.add_argument("--seed", type=seed, default=0, help="seed of position, size and background")
    i.add_argument("--output", required=True, help="folder to write into (created)")
    st = sub.add_parser("study", help="the seeded disentanglement study: conditions x seeds, rates with 95%% intervals, "
                                      "the mechanism (docs/world.md: Does QR-LoRA disentangle?); resumes where it stopped")
    st.add_argument("--output", required=True, help="study folder (created; run the same command again to resume)")
    st.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    st.add_argument("--conditions", default=None,
                    help="comma list of condition names (qrlora.toy.world.study.CONDITIONS), or 'all' (default; "
                         "with --quick the frozen-side conditions and their two baselines)")
    st.add_argument("--seeds", type=seed_list, default=None,
                    help="comma list of seeds for every condition (default: each condition's own, 3 or 5; --quick: 0)")
    st.add_argument("--jobs", type=positive(int), default=2, help="processes in parallel, one thread each (default 2)")
    st.add_argument("--samples", type=positive(int), default=None,
                    help=f"images per grid cell and seed (default 32; --quick: {QUICK.samples})")
    st.add_argument("--quick", action="store_true",
                    help=f"a few minutes' look, not a result: one seed, {QUICK.steps} training steps, weights (1, 1) "
                         f"only (its folder records these settings, so it never mixes with a full study)")
    st.add_argument("--report_dir", default=None, help="also write the report here, e.g. bench/reports (default: only in the study folder)")
    st.add_argument("--report_name", type=report_name, default="world_study",
                    help="file name of the report, NAME.{json,md,png} (default world_study)")
    v = sub.add_parser("verdict", help="merge grids of adapter pairs side by side, every cell read by the classifier "
                                        "(green: both right), and one verdict line per pair")
    v.add_argument("--grid", action="append", required=True, metavar="LABEL=FOLDER",
                   help="a pair's merge grid folder (inference_s<w>_c<w>.png), e.g. 'QR-LoRA pair=out/grid'; repeatable")
    v.add_argument("--output", required=True, help="the figure (.png) to write")
    v.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    v.add_argument("--study", default=None,
                   help="a world_study.json report: also print what the study found at weights (1, 1) (default: none)")
    c = sub.add_parser("score", help="classify the PNG images of a folder (shape, style) with a world's classifier")
    c.add_argument("folder", help="folder of .png images (e.g. a merge grid's output)")
    c.add_argument("--world", default=None, help="built world folder (default: the shipped assets/world)")
    c.add_argument("--glob", default="*.png", help="which files of the folder (default: *.png)")
    args = parser.parse_args(argv)
    command = "python -m qrlora.world " + shlex.join(sys.argv[1:] if argv is None else argv)

    if args.command == "build":
        from ..toy.world.build import build_world

        if args.width <= 0 or args.width % 32:
            raise UserError(f"--width must be a positive multiple of 32, got {args.width}")
        start = time.perf_counter()
        record = build_world(args.output, seed=args.seed, vae_steps=args.vae_steps, denoiser_steps=args.denoiser_steps,
                             classifier_steps=args.classifier_steps, width=args.width, layers=args.layers,
                             batch_size=args.batch_size, lr=args.learning_rate, threads=args.threads,
                             samples_per_pair=args.samples_per_pair, save_dtype=args.save_dtype, command=command)
        c, m = record["classifier"], record["base_model"]
        print(f"built the world at {args.output} in {(time.perf_counter() - start) / 60:.1f} min: "
              f"classifier shape {c['shape_accuracy']:.1%} style {c['style_accuracy']:.1%}; "
              f"base model seen shape {m['seen_shape_accuracy']:.1%} style {m['seen_style_accuracy']:.1%}")

    elif args.command == "experiment":
        _experiment(args, command)
    elif args.command == "study":
        _study(args, command)
    elif args.command == "verdict":
        _verdict(args)
    elif args.command == "score":
        _score(args)
    elif args.command == "images":
        folder = write_instance_images(args.output, args.shape, args.style, count=args.count, seed=args.seed)
        print(f"wrote {args.count} images of {data.caption(args.shape, args.style)!r} to {folder}")


def _score(args) -> None:
    """Print ``file: shape, style`` for every image of the folder matching ``--glob`` (sorted by name)."""
    from PIL import Image

    from ..toy.world.world import SHIPPED_WORLD, load_world

    files = sorted(Path(args.folder).glob(args.glob)) if Path(args.folder).is_dir() else []
    if not files:
        raise UserError(f"{args.folder}: no images matching {args.glob} to score")
    world = load_world(args.world or SHIPPED_WORLD)
    shapes, styles = world.classify([Image.open(f) for f in files])
    for f, shape, style in zip(files, shapes, styles):
        print(f"{f.name}: {shape}, {style}")


def _verdict(args) -> None:
    """Read each grid with the classifier, draw the side-by-side figure, print the verdict lines."""
    from ..toy.world.study import study_summary
    from ..toy.world.verdict import read_grid, verdict_figure, verdict_line
    from ..toy.world.world import SHIPPED_WORLD, load_world

    grids = {}
    for item in args.grid:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise UserError(f"--grid: expected LABEL=FOLDER, got {item!r}")
        grids[label] = folder
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise UserError(f"--output: {output} must be a .png file")
    world = load_world(args.world or SHIPPED_WORLD)
    cells = {label: read_grid(world, folder, world.new_shape, world.new_style) for label, folder in grids.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    verdict_figure(cells, data.caption(world.new_shape, world.new_style), output)
    print(verdict_line(cells))
    if args.study:
        print(study_summary(args.study))
    print(f"figure: {output}")


def _study(args, command: str) -> None:
    """Check every flag, then run (or resume) the study and print its table."""
    from ..toy.world.experiment import check_choices
    from ..toy.world.study import CONDITIONS, markdown as study_markdown
    from ..toy.world.world import SHIPPED_WORLD
    from .world_study import run_study

    conditions = args.conditions or ("all" if not args.quick else ",".join(QUICK.conditions))
    names = list(CONDITIONS) if conditions == "all" else check_choices("--conditions", conditions.split(","), list(CONDITIONS))
    quick = dict(grid=QUICK.grid, steps=QUICK.steps) if args.quick else {}
    seeds = args.seeds if args.seeds is not None or not args.quick else list(QUICK.seeds)
    samples = args.samples or (QUICK.samples if args.quick else 32)
    report = run_study(args.world or str(SHIPPED_WORLD), Path(args.output), names, seeds, jobs=args.jobs,
                       samples=samples, command=command, report_name=args.report_name,
                       report_dir=Path(args.report_dir) if args.report_dir else None, **quick)
    print(study_markdown(report))


def _experiment(args, command: str) -> None:
    """Check every flag, then run ``run_experiment`` and print the table."""
    from ..toy.world.experiment import METHOD_NAMES, check_choices
    from ..toy.world.world import SHIPPED_WORLD, load_world

    methods = METHOD_NAMES if args.methods == "all" else check_choices("--methods", args.methods.split(","), METHOD_NAMES)
    merges = list(STRATEGIES) if args.merges == "all" else check_choices("--merges", args.merges.split(","), list(STRATEGIES))
    try:
        grid = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UserError(f"--weights: expected a comma list of numbers, got {args.weights!r}") from None
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output: {output} exists and is not an empty folder; choose a new one")
    world = load_world(args.world or SHIPPED_WORLD)
    start = time.perf_counter()
    results = run_experiment(world, output, methods=methods, merges=merges, grid=grid, samples=args.samples,
                             steps=args.steps, lr=args.learning_rate, rank=args.rank, seed=args.seed, command=command)
    print((output / "results.md").read_text())
    print(f"experiment done in {(time.perf_counter() - start) / 60:.1f} min: {output / 'results.json'}")
    return results


def run_experiment(world: World, output: Path, *, methods: list[str], merges: list[str], grid: list[float],
                   samples: int, steps: int, lr: float, rank: int, seed: int, command: str) -> dict:
    """Train, merge, sample and score every method x strategy; write results.json / .md / .png into ``output``."""
    from tqdm.auto import tqdm

    from ..merging.inference import MergedPipeline

    start = time.perf_counter()
    render = render_settings(world, seed)
    results = {"command": command, "world": str(world.path), "world_build": world.record.get("command"),
               "settings": {"methods": methods, "merges": merges, "grid": grid, "samples": samples, "steps": steps,
                            "learning_rate": lr, "rank": rank, "seed": seed, "sample_steps": SAMPLE_STEPS,
                            "guidance_scale": SAMPLE_GUIDANCE, "lr_factor": LR_FACTOR},
               "prompt": data.caption(world.new_shape, world.new_style), "methods": {}}
    cells = [(c, s) for c in grid for s in grid]
    for method in tqdm(methods, desc="methods"):
        t = time.perf_counter()
        folder = output / method
        paths = {role: train_adapter(world, method, role, folder / role, steps=steps, lr=lr, rank=rank, seed=seed)
                 for role in ("content", "style")}
        adapters = [load_adapter(paths["content"]), load_adapter(paths["style"])]
        entry = {"dw_similarity": dw_similarity(paths["content"], paths["style"]), "strategies": {}}
        for name in merges:
            if STRATEGIES[name].pair_only and not get_method(method).static:
                entry["strategies"][name] = {"skipped": f"{method} adapters are token-dependent; {name} needs dW"}
                continue
            merged = MergedPipeline(str(world.path), adapters, None, render, strategy=name, roles=(0, 1))
            sampler = Sampler(world, merged, samples)
            if name == "direct":
                entry.update(sampler.leakage())
                if "base" not in results:  # weights 0 restore the base weights exactly: one measurement serves all
                    results["base"] = {**sampler.cell((0.0, 0.0)), **sampler.leakage(((0.0, 0.0), (0.0, 0.0)))}
            entry["strategies"][name] = {"cells": [sampler.cell(cell) for cell in cells]}
        entry["seconds"] = round(time.perf_counter() - t, 1)
        results["methods"][method] = entry
    results["seconds"] = round(time.perf_counter() - start, 1)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "results.md").write_text(markdown(results))
    plot(results, output / "results.png")
    return results
