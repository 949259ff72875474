"""``python -m qrlora.ziplora``: learn ZipLoRA merge coefficients.
A published command name only: the command is ``qrlora.cli.ziplora.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.ziplora import main

    main()
