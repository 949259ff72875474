"""Backbone registry: one small object per model family, all behind ``backbones.base.Backbone``."""
from __future__ import annotations

from ..errors import UserError
from .base import Backbone, read_model_index
from .flux import Flux
from .sd3 import SD3
from .sdxl import SDXL

BACKBONES: dict[str, Backbone] = {b.name: b for b in (SD3(), Flux(), SDXL())}


def backbone_for_pipeline_class(class_name: str) -> Backbone | None:
    return next((b for b in BACKBONES.values() if b.pipeline_class == class_name), None)


def backbone_of_layers(component: str, layer_paths, recorded: str | None = None) -> Backbone | None:
    """The family an adapter file belongs to (the one place that infers it): its recorded ``backbone`` metadata,
    else the family whose denoiser is ``component`` and whose stages (``block_stages``) hold every adapted layer,
    the one with the fewest stages when several do (SD3's joint blocks are also FLUX's double blocks; FLUX adds
    single blocks). Files from the published code carry no metadata. None when no family fits.
    """
    if recorded in BACKBONES:
        return BACKBONES[recorded]
    containers = {name for b in BACKBONES.values() for name, _, _ in b.block_stages}
    used = {path.split(".", 1)[0] for path in layer_paths} & containers
    fits = [b for b in BACKBONES.values()
            if b.denoiser_name == component and used <= {name for name, _, _ in b.block_stages}]
    return min(fits, key=lambda b: len(b.block_stages)) if fits else None


def detect_backbone(model_path: str, expected: str | None = None) -> Backbone:
    """The backbone of the pipeline at ``model_path`` (from ``model_index.json``), checked against ``expected``.

    Raises:
        UserError: the path is not a pipeline, is of an unknown family, or is not the ``expected`` family.
    """
    class_name = read_model_index(model_path).get("_class_name", "")
    found = backbone_for_pipeline_class(class_name)
    if expected is not None:
        if expected not in BACKBONES:
            raise UserError(f"--backbone: unknown backbone '{expected}'; choose one of {', '.join(BACKBONES)}")
        if found is None or found.name != expected:
            what = f"a {found.name} pipeline ({class_name})" if found else f"a {class_name or 'unknown'} pipeline"
            raise UserError(f"--pretrained_model_name_or_path: {model_path} is {what}, not {expected}")
        return found
    if found is None:
        raise UserError(f"--pretrained_model_name_or_path: {model_path} is a {class_name or 'unknown'} pipeline; "
                        f"supported: {', '.join(b.pipeline_class for b in BACKBONES.values())}")
    return found


#: The denoiser folders adapter files name as their component (``transformer.``, ``unet.`` key prefixes).
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(b.denoiser_name for b in BACKBONES.values()))

__all__ = ["BACKBONES", "COMPONENTS", "Backbone", "backbone_of_layers", "detect_backbone", "read_model_index"]
