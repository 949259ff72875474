"""SD3: merge a style and a content ICA adapter over a weight grid (dW = s dS A^T)."""

from qrlora.cli.merge import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
