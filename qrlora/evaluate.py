"""``python -m qrlora.evaluate``: score rendered images (CLIP / DINO).
A published command name only: the command is ``qrlora.cli.evaluate.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.evaluate import main

    main()
