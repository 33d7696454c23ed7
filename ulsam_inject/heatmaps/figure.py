"""The heat-map figure: one row per image, the photo then each model's map overlaid.

Each model panel is titled with the model's name, the explained class and its
probability, and marks the map's peak. With attention maps, one more panel per ULSAM block
follows its model: the block's g maps as a grid of small overlays. Drawn with matplotlib's
object-oriented API (no pyplot), so the caller's backend and figures are untouched.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ulsam_inject.errors import MissingDependencyError, OutputError
from ulsam_inject.io.fileio import atomic_write, check_output_path

__all__ = ["FORMATS", "check_figure_path", "draw", "save_figure"]

FORMATS = (".png", ".svg")
PANEL_INCHES = 2.6


def check_figure_path(path: str | os.PathLike[str], *, force: bool) -> Path:
    """``path`` if a figure can be written there (.png or .svg; existing only with ``force``)."""
    target = Path(os.fspath(path))
    if target.suffix.lower() not in FORMATS:
        raise OutputError(f"figure {target} must end in .png or .svg, got {target.suffix!r}")
    return check_output_path(target, force=force)


def draw(explanation: Any) -> Any:
    """The matplotlib Figure of an :class:`~ulsam_inject.heatmaps.explanation.Explanation`."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "heat-map figures need matplotlib: pip install 'ulsam-inject[explain]'"
        ) from None
    models = len(explanation.models)
    rows = len(explanation.images)
    first_row = explanation.maps[:models]
    columns = 1 + sum(1 + len(m.attention) for m in first_row)
    figure = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.35 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, image_name in enumerate(explanation.images):
        maps = explanation.maps[row * models : (row + 1) * models]
        photo = axes[row, 0]
        photo.imshow(maps[0].picture)
        photo.set_title(image_name, fontsize=8)
        column = 1
        for model_map in maps:
            axis = axes[row, column]
            axis.imshow(model_map.picture)
            axis.imshow(model_map.cam, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            peak_row, peak_col = model_map.stats.peak
            axis.plot([peak_col], [peak_row], marker="+", color="white", markersize=9)
            target = model_map.target
            axis.set_title(
                f"{model_map.model}\n{target.name} {100 * target.probability:.1f}%",
                fontsize=8,
            )
            column += 1
            for block, block_maps in model_map.attention.items():
                axis = axes[row, column]
                count = block_maps.shape[0]
                pictures = np.repeat(model_map.picture[None], count, axis=0)
                axis.imshow(_tile(pictures, fill=1.0))
                axis.imshow(
                    _tile(block_maps, fill=np.nan), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0
                )
                axis.set_title(f"{model_map.model}\n{block} (g={count})", fontsize=8)
                column += 1
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    return figure


def _tile(tiles: np.ndarray, *, fill: float) -> np.ndarray:
    """``tiles`` (n, H, W[, C]) laid out in a near-square grid, ``fill`` between and after."""
    count, height, width = tiles.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pad = max(1, height // 32)
    shape = (rows * height + (rows - 1) * pad, columns * width + (columns - 1) * pad)
    canvas = np.full(shape + tiles.shape[3:], fill, dtype=np.float32)
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = r * (height + pad), c * (width + pad)
        canvas[top : top + height, left : left + width] = tiles[index]
    return canvas


def save_figure(
    figure: Any, path: str | os.PathLike[str], *, force: bool = False, dpi: int = 110
) -> Path:
    """Write ``figure`` to ``path`` (.png or .svg) atomically; returns the path."""
    target = check_figure_path(path, force=force)

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format=target.suffix.lower().lstrip("."), dpi=dpi)

    return atomic_write(target, write, force=force)
