"""``python -m qrlora.world``: build, train and study the CPU world.
A published command name only: the command is ``qrlora.cli.world.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.world import main

    raise SystemExit(main())
