"""The one CLI layer: every command's parser and ``main(argv=None)``, each wrapped by ``qrlora.errors.cli_entry``.

One module per command, named after the library module whose work it drives:

* :mod:`.train`: ``python -m qrlora.train`` / ``qrlora-train`` (the flags and the checks on their values);
* :mod:`.merge`: ``python -m qrlora.merge`` / ``qrlora-merge`` (``merge_main``) and the published weight-grid scripts
  (``SD3_dir/inference*.py``, ``flux_dir/inference_merge_residual.py``, ``SDXL_dir/inference_merge.py``,
  ``qrlora-grid``: ``grid_main``);
* :mod:`.residual`: ``save_SD3_residual.py`` / ``save_flux_residual.py`` / ``qrlora-residual`` and
  ``extract_residual_from_checkpoint.py`` / ``qrlora-extract-residual``;
* :mod:`.export`, :mod:`.evaluate`, :mod:`.compare`, :mod:`.ziplora`, :mod:`.runs`, :mod:`.tiny`,
  :mod:`.tiny_scorers`, :mod:`.world`: the ``python -m qrlora.X`` command of the same name;
* :mod:`.analysis`: the ``test/*.py`` analysis scripts (similarity, MoE expert usage, usage comparison);
* :mod:`.arguments`: the flag groups several commands share (rendering, merge strategies, ZipLoRA, evaluation).

Library modules hold no argparse and never import this package: a command parses its flags here and calls the
library with the parsed namespace, so the imports run one way (``qrlora.cli`` -> library) and form no cycle.

``python -m qrlora.X`` keeps working: the library module ``qrlora/X.py`` starts with a guard that, when the module
runs as ``__main__``, hands over to ``qrlora.cli.X`` *before the module defines anything*. The CLI then imports
``qrlora.X`` once, as itself; a ``__main__`` block at the end of the module would instead execute the whole library
a second time as ``__main__`` (two copies of every class and registry, the bug ``qrlora.merge`` once had).
"""
