"""The residual from the bases stored in an adapter file: exact for every static method, FLUX, SD3 and SDXL files."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain clone, no install needed

from qrlora.residual import extract_main

if __name__ == "__main__":
    extract_main()
