"""Images in: read a file, turn it into the model's input, and back into a picture to draw on.

The input is made with the model's own preprocessing (:func:`ulsam_inject.train.data.
build_transform` of its :class:`~ulsam_inject.train.data.DataConfig`, as ``evaluate``
does); the picture is that input with the normalization undone, so a heat map drawn on it
lies exactly on the pixels the model saw.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulsam_inject.errors import ImageError, first_line
from ulsam_inject.guards import echo_path
from ulsam_inject.train.data import DataConfig, build_transform

__all__ = ["model_input", "picture", "read_image"]


def read_image(path: str | os.PathLike[str], *, channels: int = 3) -> Any:
    """The image at ``path`` as a PIL image in RGB (or grey for 1-channel models).

    A missing file or one PIL cannot decode is an :class:`ImageError` naming the file.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "red.png")
        >>> Image.new("RGB", (8, 6), "red").save(path)
        >>> read_image(path).size
        (8, 6)
    """
    from PIL import Image

    file = Path(os.fspath(path))
    if not file.is_file():
        raise ImageError(f"image {echo_path(file)} does not exist or is not a file")
    try:
        with Image.open(file) as opened:
            opened.load()
            return opened.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(
            f"{echo_path(file)} is not an image that can be read ({first_line(error)})"
        ) from None


def model_input(image: Any, config: DataConfig) -> torch.Tensor:
    """``image`` (PIL) preprocessed for a model with ``config``: a ``(1, C, H, W)`` tensor."""
    tensor: torch.Tensor = build_transform(config, train=False)(image)
    return tensor.unsqueeze(0)


def picture(tensor: torch.Tensor, config: DataConfig) -> np.ndarray:
    """A model input ``(1, C, H, W)`` as an ``(H, W, 3)`` float picture in [0, 1]."""
    mean = torch.tensor(config.mean).view(-1, 1, 1)
    std = torch.tensor(config.std).view(-1, 1, 1)
    pixels = (tensor[0].detach().cpu().float() * std + mean).clamp(0, 1)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    result: np.ndarray = pixels[:3].permute(1, 2, 0).numpy()
    return result
