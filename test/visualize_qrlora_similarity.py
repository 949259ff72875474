"""Per-layer similarity of two adapters (cosine, linear CKA, NMI of Q, R, dR, dW ...), or with --compare the
paper's figure: dW similarity of a QR-LoRA pair next to a plain-LoRA pair. All the work is in qrlora.evaluation.analysis.

    python test/visualize_qrlora_similarity.py --lora1_path sty/pytorch_lora_weights.safetensors \
        --lora2_path cnt/pytorch_lora_weights.safetensors --lora1_name sty --lora2_name cnt --output_dir out --fixed_scale
"""
from qrlora.cli.analysis import similarity_main


def main(argv=None):
    return similarity_main(
        argv, description="Analyze the similarity between two QR-LoRA (or LoRA, ICA, SVD, MoE ...) adapter files, layer by layer",
        lora1_name="style", lora2_name="content", output_dir="deltaR_similarity_analysis")


if __name__ == "__main__":
    main()
