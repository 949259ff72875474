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


__all__ = ["BACKBONES", "Backbone", "detect_backbone", "read_model_index"]
