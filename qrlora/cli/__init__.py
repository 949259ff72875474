"""The one CLI layer: every command's parser and ``main(argv=None)``, each wrapped by ``qrlora.errors.cli_entry``.

Which module holds which command, and the rule that library modules hold no argparse and never import this package
(``tests/test_structure.py``), are described in docs/ARCHITECTURE.md section 3.
"""
