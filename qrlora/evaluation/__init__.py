"""Measuring adapters and images: CLIP / DINO scores (``evaluate``), the strategy comparison (``compare``) and
the disentanglement analyses (``analysis``).
"""
