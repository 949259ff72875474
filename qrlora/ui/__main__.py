"""``python -m qrlora.ui``: a published command name only; the command is ``qrlora.cli.ui.main``."""
if __name__ == "__main__":
    from qrlora.cli.ui import main

    main()
