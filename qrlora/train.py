"""``python -m qrlora.train``: train an adapter.
A published command name only: the command is ``qrlora.cli.train.main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.train import main

    main()
    raise SystemExit(0)
