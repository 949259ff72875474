"""The benchmarks: ratios against the peers (PEFT LoRA, the published algorithm), measured side by side in one run.

A package so the scripts import their helpers (``bench._common``) and the in-tree ``qrlora`` as ordinary modules.
Run them from the repository root as modules: ``python -m bench.decompose``, ``python -m bench.train_step``, ...
(docs/benchmarks.md).
"""
