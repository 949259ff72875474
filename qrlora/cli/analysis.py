"""The analysis scripts' CLIs (``test/visualize_qrlora_similarity.py``, ``test/analyze_sd3_ica_similarity.py``,
``test/analyze_moe_experts.py``, ``test/compare_expert_usage.py``): their flags and the calls into
``qrlora.evaluation.analysis``. Each script is one ``*_main`` here; the two similarity scripts pass their own description,
labels and output folder (the ICA one also restricts the method)."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..evaluation import analysis
from ..evaluation.analysis.experts import CompareUsageSettings, ExpertUsageSettings
from ..evaluation.analysis.metrics import DEFAULT_BINS, METRICS
from ..core.devices import DTYPES, resolve_device
from ..errors import UserError, cli_entry
from .arguments import ArgumentParser, settings_from


# =========================================================================================================
# Adapter-pair similarity
# =========================================================================================================
def add_similarity_arguments(parser: argparse.ArgumentParser, *, lora1_name: str = "style",
                             lora2_name: str = "content", output_dir: str = "deltaR_similarity_analysis") -> argparse.ArgumentParser:
    """The published flags (``--lora1_path --lora2_path --lora1_name --lora2_name --output_dir --fixed_scale``)
    plus ``--bins``, ``--device``, ``--dpi`` and the ``--compare`` mode against a plain-LoRA pair."""
    parser.add_argument("--lora1_path", required=True, help="first adapter file (pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora2_path", required=True, help="second adapter file, same rank and base model")
    parser.add_argument("--lora1_name", default=lora1_name, help=f"label of the first adapter (default: {lora1_name})")
    parser.add_argument("--lora2_name", default=lora2_name, help=f"label of the second adapter (default: {lora2_name})")
    parser.add_argument("--output_dir", default=output_dir, help=f"where figures and JSON go (default: {output_dir})")
    parser.add_argument("--fixed_scale", action="store_true",
                        help="fixed metric axes (cosine -1..1, CKA and NMI 0..1) instead of automatic ones")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS,
                        help=f"histogram bins per variable for the NMI estimate (default: {DEFAULT_BINS})")
    parser.add_argument("--device", default="auto", help="torch device for the metrics: auto (cuda if available), cpu, cuda:0 ...")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures (default: 150)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output_dir")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), metavar="METRIC",
                        help=f"metrics to compute, any of {' '.join(METRICS)} (default: all; NMI is the slowest)")
    parser.add_argument("--matrices", nargs="+", metavar="TYPE",
                        help="matrix types to compare, e.g. dR dW (default: all the files hold: Q R dR dW for deltaR, "
                             "A S0 dS dW for ica, A B dW for lora, ...)")
    parser.add_argument("--compare", action="store_true",
                        help="paper figure: dW similarity of this pair next to a plain-LoRA pair "
                             "(--baseline1_path/--baseline2_path, trained with --lora_init_method lora)")
    parser.add_argument("--baseline1_path", help="--compare: plain-LoRA adapter trained on the first task")
    parser.add_argument("--baseline2_path", help="--compare: plain-LoRA adapter trained on the second task")
    return parser


def run_similarity_cli(args: argparse.Namespace, *, require_method: Sequence[str] | None = None) -> dict:
    """Dispatch parsed :func:`add_similarity_arguments` flags to ``run_similarity`` or ``run_compare``."""
    device = resolve_device(args.device)
    names = (args.lora1_name, args.lora2_name)
    common = dict(names=names, fixed_scale=args.fixed_scale, bins=args.bins, device=device, dpi=args.dpi,
                  metrics=args.metrics, overwrite=args.overwrite)
    if args.compare:
        missing = [f for f, v in (("--baseline1_path", args.baseline1_path), ("--baseline2_path", args.baseline2_path)) if not v]
        if missing:
            raise UserError(f"--compare needs {' and '.join(missing)} (the plain-LoRA pair)")
        return analysis.run_compare((args.lora1_path, args.lora2_path), (args.baseline1_path, args.baseline2_path),
                           args.output_dir, **common)
    if args.baseline1_path or args.baseline2_path:
        raise UserError("--baseline1_path/--baseline2_path: only used with --compare")
    return analysis.run_similarity(args.lora1_path, args.lora2_path, args.output_dir, require_method=require_method,
                          matrices=args.matrices, **common)


@cli_entry
def similarity_main(argv=None, *, description: str = "Analyze the similarity between two adapter files, layer by layer",
                    lora1_name: str = "style", lora2_name: str = "content", output_dir: str = "deltaR_similarity_analysis",
                    require_method: Sequence[str] | None = None) -> dict:
    """``test/visualize_qrlora_similarity.py`` (any methods) and ``test/analyze_sd3_ica_similarity.py`` (ICA only)."""
    parser = ArgumentParser(description=description)
    add_similarity_arguments(parser, lora1_name=lora1_name, lora2_name=lora2_name, output_dir=output_dir)
    return run_similarity_cli(parser.parse_args(argv), require_method=require_method)


# =========================================================================================================
# MoE expert usage
# =========================================================================================================
def add_expert_usage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Published flags (``--model_path --lora_path --prompt --rank --num_experts --output_dir --device``) and
    ``--prompts_file``, ``--num_inference_steps``, ``--guidance_scale``, ``--height/--width``, ``--seed``,
    ``--dtype``, ``--lora_name``, ``--dpi``."""
    parser.add_argument("--model_path", required=True, help="base pipeline folder or hub id the adapter was trained on")
    parser.add_argument("--lora_path", required=True, help="MoE adapter file (--lora_init_method moe)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt; repeat the flag for several (default: 'a dog' if no --prompts_file)")
    parser.add_argument("--prompts_file", help="text file with one prompt per line (added to --prompt)")
    parser.add_argument("--rank", type=int, help="optional check: the adapter's rank must equal this")
    parser.add_argument("--num_experts", type=int, help="optional check: the adapter's expert count must equal this")
    parser.add_argument("--num_inference_steps", type=int, default=10, help="denoising steps per prompt (default: 10)")
    parser.add_argument("--guidance_scale", type=float, default=0.0, help="CFG scale (default: 0.0, no CFG, as published)")
    parser.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="pipeline dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--lora_name", help="label in titles and JSON (default: the adapter's run folder or file name)")
    parser.add_argument("--output_dir", default="analysis_results", help="where figures and JSON go")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0 ...")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figures (default: 150)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output_dir")
    return parser


def add_compare_usage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--content_usage --style_usage`` (expert_usage.json or its folder), names, ``--output_dir``, ``--dpi``."""
    parser.add_argument("--content_usage", required=True, help="expert_usage.json of the content MoE adapter (or its folder)")
    parser.add_argument("--style_usage", required=True, help="expert_usage.json of the style MoE adapter (or its folder)")
    parser.add_argument("--content_name", default="content", help="label of the content adapter")
    parser.add_argument("--style_name", default="style", help="label of the style adapter")
    parser.add_argument("--output_dir", default="analysis_result", help="where the figure and JSON go")
    parser.add_argument("--dpi", type=int, default=150, help="resolution of the PNG figure (default: 150)")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output_dir")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` (repeatable) then the lines of ``--prompts_file``; empty when neither gives one."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as err:
            raise UserError(f"--prompts_file {args.prompts_file}: cannot read ({err.strerror or err})") from None
        prompts += [l.strip() for l in lines if l.strip()]
        if not prompts:
            raise UserError(f"--prompts_file {args.prompts_file}: holds no prompt")
    return prompts


@cli_entry
def expert_usage_main(argv=None) -> dict:
    """``test/analyze_moe_experts.py``: record a MoE adapter's expert usage while sampling."""
    parser = ArgumentParser(description="Analyze MoE expert usage of a QR-LoRA MoE adapter during sampling")
    add_expert_usage_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from(ExpertUsageSettings, args)
    prompts = read_prompts(args)
    return analysis.run_expert_usage(replace(settings, prompts=tuple(prompts)) if prompts else settings)


@cli_entry
def compare_usage_main(argv=None) -> dict:
    """``test/compare_expert_usage.py``: the usage difference of a content and a style MoE adapter."""
    parser = ArgumentParser(description="Compare expert usage between a content and a style MoE adapter")
    add_compare_usage_arguments(parser)
    return analysis.run_compare_usage(settings_from(CompareUsageSettings, parser.parse_args(argv)))
