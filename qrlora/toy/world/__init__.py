"""The CPU world: a small text-to-image world trained here, where content (shape) and style are known by
construction and read back by a classifier (docs/world.md; docs/ARCHITECTURE.md).

Modules: ``data`` (procedural seeded renders), ``classifier`` (the evaluator), ``build`` (trains the world),
``world`` (opening a built world, sampling, rates), ``experiment`` (what the experiment measures: rates, leakage,
tables, plot). The commands (build, experiment, images, score) are in ``qrlora.cli.world``.
"""
