"""Layer order by block depth (:func:`layer_sort_key`, :func:`block_of`): SD3/FLUX joint blocks, then FLUX
single blocks; SDXL down < mid < up."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from ...backbones import BACKBONES


# Top-level container -> (block kind, rank among the model's stages, tick prefix), from the backbone registry (each
# family's ``block_stages``, one owner): SD3's MMDiT and FLUX's double-stream blocks are "joint", FLUX's single-stream
# blocks come after them, SDXL's UNet runs down < mid < up.
_GROUPS = {name: (kind, rank, tick) for backbone in BACKBONES.values()
           for rank, (name, kind, tick) in enumerate(backbone.block_stages)}
_OTHER = ("other", 9, "")  # output heads (proj_out, norm_out, conv_out) and anything unknown: after the blocks
# Embedders run before every block.
_INPUT_MODULES = {"pos_embed", "x_embedder", "context_embedder", "time_text_embed", "conv_in", "time_embedding",
                  "add_embedding", "time_proj", "encoder_hid_proj"}
# Within a block: attention before feed-forward, q k v out, then the context (add_*) projections.
_LEAF_ORDER = {name: i for i, name in enumerate((
    "attn", "attn1", "attn2", "ff", "ff_context", "proj_mlp", "proj_out",
    "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "proj_in", "net",
))}
_CONTAINER = re.compile(r"(blocks|attentions|resnets|mid_block)$")


@dataclass(frozen=True)
class BlockInfo:
    """Where a layer sits: block ``kind`` (joint/single/down/mid/up/other), ``label`` (``J3``), ``leaf``."""

    kind: str
    label: str
    leaf: str

    @property
    def short(self) -> str:
        return f"{self.label} {self.leaf}".strip()


def block_of(path: str) -> BlockInfo:
    """``transformer_blocks.3.attn.to_q`` -> joint ``J3`` ``attn.to_q``; ``single_transformer_blocks.5.proj_mlp``
    -> single ``S5``; ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` -> down ``D1.0.0``."""
    tokens = path.split(".")
    kind, _, prefix = _GROUPS.get(tokens[0], _OTHER)
    if kind == "other":
        return BlockInfo("other", "", path)
    indices, last = [], 0
    for i, tok in enumerate(tokens[:-1]):
        if _CONTAINER.search(tok) and tokens[i + 1].isdigit():
            indices.append(tokens[i + 1])
            last = i + 1
    leaf = ".".join(tokens[last + 1:])
    return BlockInfo(kind, prefix + ".".join(indices), leaf)


def layer_sort_key(path: str) -> tuple:
    """Sort key that orders layers by depth: stage (joint < single; down < mid < up), block indices
    numerically (``blocks.10`` after ``blocks.9``), then attention before feed-forward, ``q k v out``."""
    tokens = path.split(".")
    _, rank, _ = _GROUPS.get(tokens[0], _OTHER)
    key = [-1 if tokens[0] in _INPUT_MODULES else rank]
    for tok in tokens:
        key.append((0, int(tok), "") if tok.isdigit() else (1, _LEAF_ORDER.get(tok, len(_LEAF_ORDER)), tok))
    return tuple(key)


def order_layers(paths: Iterable[str]) -> list[str]:
    """``paths`` sorted by :func:`layer_sort_key`."""
    return sorted(paths, key=layer_sort_key)
