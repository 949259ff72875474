"""SD3: a style and a content frequency-MoE adapter, merged live (each gated path scaled by its weight)."""

from qrlora.cli.merge import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
