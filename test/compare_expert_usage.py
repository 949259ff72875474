"""Difference between a content and a style MoE adapter's expert usage (two expert_usage.json files written
by test/analyze_moe_experts.py): difference heatmap, per-expert bars and usage_comparison.json.

    python test/compare_expert_usage.py --content_usage moe_cnt/expert_usage.json \
        --style_usage moe_sty/expert_usage.json --output_dir usage_compare
"""
from qrlora.cli.analysis import compare_usage_main as main

if __name__ == "__main__":
    main()
