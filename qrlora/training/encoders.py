"""The frozen encoders of a training run (text encoders, VAE), loaded only when something must be computed.

Prompt conditioning and each image's latent distribution are computed once per run; with a ``DiskCache``
(``--cache_dir``) they are read back from disk when their key matches, and then the text encoders and the VAE
are never loaded. Keys name everything that changes the result: the backbone, the content of the component's
files (``DiskCache.files_fingerprint``), the prompts or the preprocessed pixels (which carry the image bytes,
resolution, crop and flip), ``max_sequence_length``, the dtype and the device type.

Validation still decodes with the VAE: ``vae()`` loads it the first time validation runs (its prompts come
from the cache too, so the text encoders stay unloaded).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers.training_utils import free_memory

from .cache import DiskCache, tensor_digest
from ..core.objective import Cond


def local_root(model_path: str, names: list[str]) -> Path:
    """The local folder of a pipeline (or VAE) folder or hub id, with the files of ``names`` present."""
    if Path(model_path).is_dir():
        return Path(model_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, allow_patterns=[p for n in names for p in (n, f"{n}/*")]))


class Encoders:
    """Text encoders and VAE of ``backbone`` at ``model_path`` (``vae_path``: a separate VAE), on ``device``.

    ``device``, ``dtype`` (the VAE's), ``config`` and ``encode`` stand in for the VAE where the trainer only
    needs those (``qrlora.training.trainer.batch_latents``); ``vae()`` is the module itself.
    """

    def __init__(self, backbone, model_path: str, *, vae_path: str | None, device, text_dtype: torch.dtype,
                 vae_dtype: torch.dtype, max_sequence_length: int, cache: DiskCache | None = None):
        self.backbone, self.model_path, self.vae_path = backbone, model_path, vae_path
        self.device, self.text_dtype, self.dtype = torch.device(device), text_dtype, vae_dtype
        self.max_sequence_length, self.cache = max_sequence_length, cache
        self._text = self._vae = self._config = None
        self._fingerprints: dict[str, str] = {}

    # ---- lazily loaded parts ------------------------------------------------------------------------------
    def text_pipeline(self):
        """The pipeline's text encoders and tokenizers, on the device (loaded on first use)."""
        if self._text is None:
            self._text = self.backbone.load_text_pipeline(self.model_path, self.text_dtype).to(self.device)
        return self._text

    def free_text(self) -> None:
        """Drop the text encoders once every prompt is encoded (the T5 alone is ~9 GB on FLUX)."""
        if self._text is not None:
            self._text = None
            free_memory()

    def vae(self) -> torch.nn.Module:
        """The frozen VAE on the device in its training dtype (loaded on first use)."""
        if self._vae is None:
            vae = self.backbone.load_vae(self.model_path, self.vae_path)
            self._vae = vae.to(self.device, dtype=self.dtype).requires_grad_(False)
        return self._vae

    @property
    def config(self):
        """The VAE's config (scaling and shift factors), read without loading its weights when it is not loaded."""
        if self._vae is not None:
            return self._vae.config
        if self._config is None:
            from accelerate import init_empty_weights
            from diffusers import AutoencoderKL

            path, sub = (self.vae_path, None) if self.vae_path else (self.model_path, "vae")
            with init_empty_weights():  # a weightless model: its .config holds every default the real one has
                self._config = AutoencoderKL.from_config(AutoencoderKL.load_config(path, subfolder=sub)).config
        return self._config

    def encode(self, pixels: torch.Tensor):
        """``vae.encode`` of (B, 3, H, W) pixels (the VAE's output, ``.latent_dist`` included)."""
        return self.vae().encode(pixels.to(self.device, self.dtype))

    # ---- cached computations ------------------------------------------------------------------------------
    def _fingerprint(self, part: str) -> str:
        if part not in self._fingerprints:
            if part == "text":
                names = [*self.backbone.text_encoder_names, "model_index.json"]
                root = local_root(self.model_path, names)
            else:
                names = ["."] if self.vae_path else ["vae"]
                root = local_root(self.vae_path or self.model_path, [] if self.vae_path else names)
            self._fingerprints[part] = self.cache.files_fingerprint(root, names)
        return self._fingerprints[part]

    def _cached(self, kind: str, part: str, fields: dict, compute) -> dict[str, torch.Tensor]:
        if self.cache is None:
            return compute()
        dtype = self.text_dtype if part == "text" else self.dtype
        key = {"kind": kind, "backbone": self.backbone.name, "model": self._fingerprint(part), "dtype": str(dtype),
               "device": self.device.type, **fields}
        found = self.cache.get(key)
        if found is not None:
            return {k: v.to(self.device) for k, v in found.items()}
        value = compute()
        self.cache.put(key, value)
        return value

    @torch.no_grad()
    def prompts(self, prompts: list[str]) -> Cond:
        """``backbone.encode_prompts`` of ``prompts`` (prompt i at index i), from the cache when there."""
        return self._cached("prompts", "text", {"prompts": list(prompts), "max_sequence_length": self.max_sequence_length},
                            lambda: self.backbone.encode_prompts(self.text_pipeline(), list(prompts), self.device,
                                                                 self.max_sequence_length))

    @torch.no_grad()
    def negative(self) -> Cond:
        """The pipeline's unconditional conditioning (``backbone.negative_cond``), from the cache when there."""
        return self._cached("negative", "text", {"max_sequence_length": self.max_sequence_length},
                            lambda: self.backbone.negative_cond(self.text_pipeline(), self.device, self.max_sequence_length))

    @torch.no_grad()
    def latent_params(self, pixels: torch.Tensor, caption: str | None = None, bucket: list[int] | None = None) -> torch.Tensor:
        """The latent distribution's parameters (1, 2C, h, w) (mean and log-variance) of (1, 3, H, W) pixels.

        A disk cache keys the entry on the pixels, the image's caption and its [width, height] bucket too, so an entry
        of a changed caption or resolution is never reused for another (and reads as what it is).
        """
        return self._cached("latents", "vae", {"pixels": tensor_digest(pixels), "caption": caption, "bucket": bucket},
                            lambda: {"parameters": self.encode(pixels).latent_dist.parameters})["parameters"]
