"""SDXL: merge a style and a content adapter over a weight grid (residual form with --residual_path, else delta form)."""

from qrlora.cli.merge import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
