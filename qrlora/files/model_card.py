"""The model card (``README.md``) every training run writes beside its adapter, as diffusers' training scripts do.

The card is a Hugging Face model card (``huggingface_hub.ModelCard``: YAML metadata, then markdown) describing the
adapter file as saved: base model and its licence, backbone, method, rank, alpha, targets, the instance prompt
(trigger), the validation images, the command that trained it, and how to load it with diffusers and with our merge.
"""
from __future__ import annotations

import inspect
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from huggingface_hub import ModelCard, ModelCardData

from .checkpoint import AdapterFile
from ..core.devices import DTYPES, MIXED_PRECISION_DTYPES

CARD_FILENAME = "README.md"

# Licences of the backbones' default models (their hub model cards). A local base model is looked up in its own
# README.md; anything else is reported as unknown rather than guessed.
KNOWN_LICENSES = {
    "black-forest-labs/FLUX.1-dev": {
        "license": "other", "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
    "stabilityai/stable-diffusion-3-medium-diffusers": {
        "license": "other", "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/LICENSE.md",
    },
    "stabilityai/stable-diffusion-xl-base-1.0": {"license": "openrail++"},
}

TEMPLATE = """---
{{ card_data }}
---

# QR-LoRA {{ method }} adapter for {{ base_model }}

{{ summary }}

| | |
|---|---|
| base model | `{{ base_model }}` |
| backbone | {{ backbone }} |
| method | `{{ method }}` |
| rank / alpha | {{ rank }} / {{ alpha }} (scale {{ scale }}) |
| target modules | {{ targets }} |
| instance prompt (trigger) | `{{ instance_prompt }}` |
| files | {{ files }} |

## Validation images

{{ validation }}

## How to use

{{ usage }}

## Training command

```bash
{{ command }}
```

## Licence

{{ licence }}
"""


def base_model_license(base_model: str) -> dict[str, str]:
    """``license`` (and ``license_name`` / ``license_link`` for "other") of the base model, or ``unknown``."""
    if base_model in KNOWN_LICENSES:
        return dict(KNOWN_LICENSES[base_model])
    readme = Path(base_model) / CARD_FILENAME
    if readme.is_file():
        data = ModelCard.load(readme).data.to_dict()
        found = {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}
        if found:
            return found
    return {"license": "unknown"}


@dataclass(frozen=True)
class CardSnippetSettings:
    """How the run rendered its validation images, so the card's snippets load and call the pipeline the same way:
    ``dtype`` a ``qrlora.core.devices.DTYPES`` name, ``device`` a torch device type, ``max_sequence_length`` None when
    the run used the pipeline's default (or the pipeline takes none)."""

    dtype: str = "bfloat16"
    device: str = "cuda"
    height: int = 1024
    width: int = 1024
    max_sequence_length: int | None = None

    def merge_flags(self) -> str:
        """The ``qrlora.merging.merger`` flags that reproduce these settings."""
        flags = ["--height", str(self.height), "--width", str(self.width), "--dtype", self.dtype, "--device", self.device]
        if self.max_sequence_length is not None:
            flags += ["--max_sequence_length", str(self.max_sequence_length)]
        return shlex.join(flags)

    def call_kwargs(self) -> str:
        """The pipeline-call keyword arguments, as Python source (``, height=512, width=512``)."""
        extra = f", max_sequence_length={self.max_sequence_length}" if self.max_sequence_length is not None else ""
        return f", height={self.height}, width={self.width}{extra}"


def card_snippet_settings(pipeline_cls, *, mixed_precision: str, device: str, resolution: int,
                          max_sequence_length: int | None) -> CardSnippetSettings:
    """A training run's ``CardSnippetSettings``: its mixed-precision dtype, device type and resolution, and its
    ``--max_sequence_length`` where it set one and ``pipeline_cls`` takes one (SDXL's pipeline has no T5)."""
    takes_length = "max_sequence_length" in inspect.signature(pipeline_cls.__call__).parameters
    return CardSnippetSettings(dtype=str(MIXED_PRECISION_DTYPES[mixed_precision]).removeprefix("torch."), device=device,
                               height=resolution, width=resolution,
                               max_sequence_length=max_sequence_length if takes_length else None)


def _usage(adapter: AdapterFile, adapter_name: str, kohya_name: str | None, pipeline_class: str, prompt: str,
           settings: CardSnippetSettings) -> str:
    merge = (f"```bash\npython -m qrlora.merge --model_path {shlex.quote(str(adapter.base_model))} --adapters {shlex.quote(adapter_name)} --weights 1.0 \\\n"
             f"  --prompt {shlex.quote(prompt)} {settings.merge_flags()}\n```\n\nCombine it with another adapter of the "
             "same base (e.g. style + content) by listing both files and two weights.")
    if not adapter.method.static:
        return ("This adapter's change depends on the token (frequency MoE), so it has no standard LoRA form; load it "
                "with QR-LoRA, which merges it live:\n\n" + merge)
    diffusers_part = (
        f"With diffusers (export once to the standard LoRA layout, `B A = dW`):\n\n"
        f"```bash\npython -m qrlora.export {adapter_name} lora_diffusers.safetensors\n```\n\n"
        f"```python\nimport torch\nfrom diffusers import {pipeline_class}\n\n"
        f"pipe = {pipeline_class}.from_pretrained({adapter.base_model!r}, torch_dtype={DTYPES[settings.dtype]}).to({settings.device!r})\n"
        f"pipe.load_lora_weights(\"lora_diffusers.safetensors\")\n"
        f"image = pipe({prompt!r}{settings.call_kwargs()}).images[0]\n```\n\n"
        f"With QR-LoRA's merge (the file as trained, no export):\n\n{merge}\n\n")
    kohya = (f"ComfyUI, A1111/Forge and kohya's tools: load `{kohya_name}` (written with `--output_kohya_format`)."
             if kohya_name else
             f"ComfyUI, A1111/Forge and kohya's tools: `python -m qrlora.export {adapter_name} lora_kohya.safetensors "
             "--format kohya`, then load that file.")
    return diffusers_part + kohya


def render_model_card(adapter: AdapterFile, *, adapter_name: str, pipeline_class: str, command: str,
                      validation_prompt: str | None = None, validation_images: Sequence[str] = (),
                      kohya_name: str | None = None, settings: CardSnippetSettings = CardSnippetSettings()) -> ModelCard:
    """The model card of one training run (``validation_images`` and file names relative to the run folder);
    ``settings``: the run's dtype, device, size and prompt length, written into the snippets."""
    meta = adapter.metadata
    base_model = adapter.base_model or "unknown"
    licence = base_model_license(base_model)
    prompt = meta.get("instance_prompt", "")
    shown_prompt = validation_prompt or prompt
    targets = json.loads(meta.get("target_modules") or "[]")
    widget = [{"text": shown_prompt, "output": {"url": image}} for image in validation_images]
    card_data = ModelCardData(
        base_model=None if adapter.base_model is None or Path(base_model).exists() else base_model,  # hub ids only
        library_name="diffusers", instance_prompt=prompt or None, widget=widget or None,
        tags=["text-to-image", "diffusers", "lora", "qr-lora", adapter.backbone or "unknown-backbone", adapter.config.method],
        **licence,
    )
    if licence["license"] == "unknown":
        licence_text = (f"The licence of `{base_model}` could not be determined here; this adapter is a derivative of "
                        "that model, so check and follow the base model's licence before using or sharing it.")
    else:
        name = licence.get("license_name", licence["license"])
        link = f" ({licence['license_link']})" if "license_link" in licence else ""
        licence_text = (f"This adapter is a derivative of `{base_model}` and is governed by its licence: "
                        f"`{name}`{link}.")
    files = [f"`{adapter_name}` (QR-LoRA adapter)"] + ([f"`{kohya_name}` (kohya / ComfyUI layout)"] if kohya_name else [])
    return ModelCard.from_template(
        card_data, template_str=TEMPLATE,
        method=adapter.config.method, base_model=base_model, backbone=adapter.backbone or "unknown",
        rank=adapter.config.rank, alpha=f"{adapter.config.lora_alpha:g}", scale=f"{adapter.config.scale:g}",
        targets=f"{len(adapter.layers)} Linears matching " + ", ".join(f"`{t}`" for t in targets),
        instance_prompt=prompt, files=", ".join(files),
        summary=(f"A QR-decomposed adapter (Yang et al., 2025, *QR-LoRA*) trained with DreamBooth on `{base_model}`: "
                 "each targeted Linear `W` keeps its frozen basis (QR, SVD or ICA of `W`) and learns only coefficients on it; the adapter stores the change `dW`, never `W`."),
        validation="\n".join(f"![{shown_prompt}]({image})" for image in validation_images)
        or "No validation images (the run had no `--validation_prompt`).",
        usage=_usage(adapter, adapter_name, kohya_name, pipeline_class, shown_prompt or "a photo", settings),
        command=command, licence=licence_text,
    )


def write_model_card(folder: str | Path, adapter: AdapterFile, **kwargs) -> Path:
    """Render the card (see ``render_model_card``) and save it as ``folder/README.md``."""
    path = Path(folder) / CARD_FILENAME
    render_model_card(adapter, **kwargs).save(path)
    return path
