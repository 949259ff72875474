"""``python -m qrlora.merge``: merge adapters into the base model and render.
A published command name only: the command is ``qrlora.cli.merge.merge_main``,
the library behind it lives in the subpackages (docs/ARCHITECTURE.md section 3)."""
if __name__ == "__main__":
    from qrlora.cli.merge import merge_main

    merge_main()
