"""``python -m qrlora.world``: the CLI lives in ``qrlora.world.cli`` (a package ``__main__`` imports it, so the
library modules are imported once, as in ``qrlora.merge``)."""
import sys

from qrlora.world.cli import main

if __name__ == "__main__":
    sys.exit(main())
