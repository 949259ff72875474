"""``python -m qrlora.tiny``: build a tiny random pipeline offline.
A published command name only: the command is ``qrlora.cli.tiny.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.tiny import main

    main()
