"""What goes to and from disk: adapter files (``checkpoint``), atomic writes and staged folders (``outputs``),
run folders and their locks (``run_folder``), model cards (``model_card``), hub upload (``hub``), diffusers / kohya
export (``export``), base residuals (``residual``) and finding the runs the wrappers wrote (``runs``).
"""
