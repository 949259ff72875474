"""FLUX: residual W - s * basis of every targeted layer of the base model (flux_residual_weights.safetensors)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain clone, no install needed

from qrlora.residual import save_base_residual_main

if __name__ == "__main__":
    save_base_residual_main(backbone_name="flux")
