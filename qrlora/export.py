"""``python -m qrlora.export``: export an adapter as a diffusers or kohya LoRA file.
A published command name only: the command is ``qrlora.cli.export.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.export import main

    main()
