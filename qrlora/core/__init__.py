"""The math and the adapter: the decomposition (``decompose``), the method registry (``methods``), the adapter
layer (``layers``), targeting and injection (``inject``), the diffusion objective (``objective``), quantized bases
(``quantize``), devices (``devices``) and prompt-length checks (``prompts``).
"""
