"""SDXL: merge a style and a content adapter over a weight grid (residual form with --residual_path, else delta form)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain clone, no install needed

from qrlora.inference import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
