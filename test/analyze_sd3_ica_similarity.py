"""Per-layer similarity of two ICA adapters (--lora_init_method ica): mixing A, sources S0, trained dS and dW.

The same analysis as test/visualize_qrlora_similarity.py (qrlora.evaluation.analysis), restricted to ICA files.

    python test/analyze_sd3_ica_similarity.py --lora1_path cnt/pytorch_lora_weights.safetensors \
        --lora2_path sty/pytorch_lora_weights.safetensors --output_dir ica_similarity_analysis --fixed_scale
"""
from qrlora.cli.analysis import similarity_main


def main(argv=None):
    return similarity_main(argv, description="Analyze the similarity between two SD3 ICA-LoRA weight files",
                           lora1_name="Content", lora2_name="Style", output_dir="ica_similarity_analysis",
                           require_method=("ica",))


if __name__ == "__main__":
    main()
