"""``python -m qrlora.tiny_scorers``: build tiny offline CLIP and DINO scorers.
A published command name only: the command is ``qrlora.cli.tiny_scorers.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.tiny_scorers import main

    main()
