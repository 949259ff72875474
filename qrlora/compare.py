"""``python -m qrlora.compare``: the paper's merge-strategy comparison.
A published command name only: the command is ``qrlora.cli.compare.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.compare import main

    main()
