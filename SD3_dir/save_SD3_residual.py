"""SD3: residual W - s * basis of every targeted layer of the base model, any static method."""

from qrlora.cli.residual import save_base_residual_main

if __name__ == "__main__":
    save_base_residual_main(backbone_name="sd3")
