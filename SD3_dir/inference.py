"""SD3: merge a style and a content adapter (deltaR / triu_deltaR / svd) over a weight grid."""

from qrlora.cli.merge import grid_main

if __name__ == "__main__":
    grid_main(description=__doc__)
