"""MoE expert usage: run the pipeline with an MoE adapter on a list of prompts and record each layer's mean
gate weight per expert over the denoising steps; heatmap (layers x experts), per-step curve and JSON.

    python test/analyze_moe_experts.py --model_path SD3 --lora_path moe/pytorch_lora_weights.safetensors \
        --prompt "a cat in <s> style" --prompt "a dog in <s> style" --output_dir moe_usage
"""
import argparse

from qrlora import analysis
from qrlora.errors import cli_entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Analyze MoE expert usage of a QR-LoRA MoE adapter during sampling")
    analysis.add_expert_usage_arguments(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv=None):
    analysis.run_expert_usage_cli(parse_args(argv))


if __name__ == "__main__":
    main()
