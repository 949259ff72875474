"""SD3: a style and a content frequency-MoE adapter, merged live (each gated path scaled by its weight)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain clone, no install needed

from qrlora.inference import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
