"""FLUX: residual W - s * basis of every targeted layer of the base model (flux_residual_weights.safetensors)."""

from qrlora.cli.residual import save_base_residual_main

if __name__ == "__main__":
    save_base_residual_main(backbone_name="flux")
