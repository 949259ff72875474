"""``python -m qrlora.runs``: find the runs the wrappers wrote.
A published command name only: the command is ``qrlora.cli.runs.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.runs import main

    main()
