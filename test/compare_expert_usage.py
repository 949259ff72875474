"""Difference between a content and a style MoE adapter's expert usage (two expert_usage.json files written
by test/analyze_moe_experts.py): difference heatmap, per-expert bars and usage_comparison.json.

    python test/compare_expert_usage.py --content_usage moe_cnt/expert_usage.json \
        --style_usage moe_sty/expert_usage.json --output_dir usage_compare
"""
import argparse

from qrlora import analysis
from qrlora.errors import cli_entry


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Compare expert usage between a content and a style MoE adapter")
    analysis.add_compare_usage_arguments(parser)
    return parser.parse_args(argv)


@cli_entry
def main(argv=None):
    analysis.run_compare_usage_cli(parse_args(argv))


if __name__ == "__main__":
    main()
