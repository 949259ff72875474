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
library, so the imports run one way (``qrlora.cli`` -> library) and form no cycle (``tests/test_structure.py``).

``python -m qrlora.X`` keeps working through a shim module ``qrlora/X.py`` that holds no library code: under
``if __name__ == "__main__"`` it hands over to ``qrlora.cli.X``, so nothing is imported twice (once as ``__main__``).
"""
