"""Putting adapters together: the merger (``merger``), the strategy registry (``strategies``) with ZipLoRA
(``ziplora``) and K-LoRA (``klora``), and rendering merged pipelines (``inference``).
"""
