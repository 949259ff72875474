"""The one trainer (``trainer``) and what it uses: DreamBooth images (``data``), prior preservation (``prior``),
text and latent encoding with its disk cache (``encoders``, ``cache``), the launch check (``launch``), block swap
(``blockswap``) and tracker images (``tracking``).
"""
