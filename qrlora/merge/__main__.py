"""``python -m qrlora.merge``: merge adapters into the base model and render (the CLI lives in ``qrlora.cli.merge``).

A package ``__main__`` rather than a ``__main__`` block in the library module: ``python -m`` on a plain module runs it
a second time as ``__main__``, and the CLI's own ``from .merge import Merger`` then built a second ``Merger`` class.
"""
if __name__ == "__main__":
    from qrlora.cli.merge import merge_main

    merge_main()
