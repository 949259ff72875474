"""The merge explorer: a web page (gradio) over the merge library. ``session`` holds what it does (requests,
the merged pipeline, the world's verdict, the similarity heatmap, the saved merge, the reproducing command),
``app`` the page; the command is ``qrlora.cli.ui`` (``python -m qrlora.ui``, ``qrlora-ui``). docs/ARCHITECTURE.md
section 3 places it in the layout."""
