"""The demo's verdict: merge grids of several adapter pairs side by side, each cell read by the world's classifier.

A grid folder is what the merge wrappers write (``inference_s<style weight>_c<content weight>.png``). Every cell
is upscaled (nearest) so a person can see the shape, captioned with the classifier's shape and style, and drawn
green when both are the ones the prompt asks for, red otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ...errors import UserError
from .world import World

CELL = re.compile(r"inference_s(?P<style>-?[0-9.]+)_c(?P<content>-?[0-9.]+)\.png$")
UPSCALE = 4  # 32 px world images -> 128 px cells


@dataclass(frozen=True)
class GridCell:
    style_weight: float
    content_weight: float
    path: Path
    shape: str
    style: str
    right: bool


def read_grid(world: World, folder: str | Path, shape: str, style: str) -> list[GridCell]:
    """Every cell of a merge grid, classified; ``right`` when it shows ``shape`` in ``style``."""
    folder = Path(folder)
    files = sorted(p for p in folder.glob("inference_s*_c*.png") if CELL.search(p.name))
    if not files:
        raise UserError(f"{folder}: no merge grid images (inference_s<w>_c<w>.png) to read")
    shapes, styles = world.classify([Image.open(p) for p in files])
    cells = []
    for p, got_shape, got_style in zip(files, shapes, styles):
        m = CELL.search(p.name)
        cells.append(GridCell(float(m["style"]), float(m["content"]), p, got_shape, got_style,
                              got_shape == shape and got_style == style))
    return cells


def verdict_figure(grids: dict[str, list[GridCell]], prompt: str, path: str | Path) -> None:
    """One labelled figure: a panel per pair (rows: content weight, columns: style weight), captions coloured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(grids.items())
    styles = sorted({c.style_weight for cells in grids.values() for c in cells})
    contents = sorted({c.content_weight for cells in grids.values() for c in cells})
    fig, axes = plt.subplots(len(contents), len(styles) * len(panels), squeeze=False,
                             figsize=(1.9 * len(styles) * len(panels), 2.0 * len(contents) + 0.6))
    for p, (label, cells) in enumerate(panels):
        by_weight = {(c.content_weight, c.style_weight): c for c in cells}
        right = sum(c.right for c in cells)
        for i, wc in enumerate(contents):
            for j, ws in enumerate(styles):
                ax = axes[i][p * len(styles) + j]
                ax.set_xticks([])
                ax.set_yticks([])
                cell = by_weight.get((wc, ws))
                if cell is None:
                    ax.axis("off")
                    continue
                image = Image.open(cell.path).convert("RGB")
                ax.imshow(image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST))
                colour = "tab:green" if cell.right else "tab:red"
                ax.set_title(f"{cell.shape}, {cell.style}", fontsize=8, color=colour)
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
                if j == 0:
                    ax.set_ylabel(f"content {wc:g}", fontsize=8)
                if i == len(contents) - 1:
                    ax.set_xlabel(f"style {ws:g}", fontsize=8)
        middle = axes[0][p * len(styles) + len(styles) // 2]
        middle.annotate(f"{label}: both right in {right}/{len(cells)}", xy=(0.5, 1.35), xycoords="axes fraction",
                        ha="center", fontsize=10, weight="bold")
    fig.suptitle(f"'{prompt}': green = the classifier sees both the shape and the style asked for", fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict_line(grids: dict[str, list[GridCell]]) -> str:
    """``QR-LoRA pair: both right in 0/9 cells; LoRA pair: 5/9``."""
    parts = [f"{label}: both right in {sum(c.right for c in cells)}/{len(cells)} cells" for label, cells in grids.items()]
    return "; ".join(parts)
