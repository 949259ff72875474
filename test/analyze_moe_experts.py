"""MoE expert usage: run the pipeline with an MoE adapter on a list of prompts and record each layer's mean
gate weight per expert over the denoising steps; heatmap (layers x experts), per-step curve and JSON.

    python test/analyze_moe_experts.py --model_path SD3 --lora_path moe/pytorch_lora_weights.safetensors \
        --prompt "a cat in <s> style" --prompt "a dog in <s> style" --output_dir moe_usage
"""
from qrlora.cli.analysis import expert_usage_main as main

if __name__ == "__main__":
    main()
