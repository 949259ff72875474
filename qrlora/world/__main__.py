"""``python -m qrlora.world``: the CLI lives in ``qrlora.cli.world`` (imported only here, under the guard, so the
library modules are imported once and never import the CLI layer)."""
import sys

if __name__ == "__main__":
    from qrlora.cli.world import main

    sys.exit(main())
