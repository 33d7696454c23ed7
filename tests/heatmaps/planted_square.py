"""A small CNN trained in a few seconds to detect a bright square planted on noise.

Positive images (class 1) hold an 8x8 square of full brightness at a random place on
uniform noise in [0, 0.6]; negatives are noise alone. Pixels are normalized with mean and
std 0.5, the data config the explainer is given (crop fraction 1: the 32x32 image is the
model's input as it is).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from ulsam_inject.train.data import DataConfig

SIZE = 32
SQUARE = 8
CONFIG = DataConfig((3, SIZE, SIZE), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=1.0)


def square_image(generator: np.random.Generator, top: int | None, left: int | None) -> np.ndarray:
    """An (H, W, 3) picture in [0, 1]: noise, and the square at (top, left) unless None."""
    pixels = generator.uniform(0.0, 0.6, size=(SIZE, SIZE, 3))
    if top is not None and left is not None:
        pixels[top : top + SQUARE, left : left + SQUARE] = 1.0
    return pixels


def as_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8))


def detector() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def trained_detector(steps: int = 60, batch: int = 32, seed: int = 0) -> nn.Sequential:
    """The detector after ``steps`` Adam steps on fresh batches (half of them with a square)."""
    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    model = detector()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        labels = generator.integers(0, 2, size=batch)
        pictures = [
            square_image(
                generator,
                *(generator.integers(0, SIZE - SQUARE + 1, size=2) if label else (None, None)),
            )
            for label in labels
        ]
        x = (torch.tensor(np.stack(pictures), dtype=torch.float32).permute(0, 3, 1, 2) - 0.5) / 0.5
        loss = nn.functional.cross_entropy(model(x), torch.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


class WithULSAM(nn.Module):
    """``stage`` followed by a ULSAM block, under the names a retrofit gives them."""

    def __init__(self, stage: nn.Module, channels: int, groups: int) -> None:
        super().__init__()
        from ulsam_inject import ULSAM

        self.stage = stage
        self.ulsam = ULSAM(channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ulsam(self.stage(x))
        return out


def with_ulsam(model: nn.Sequential, at: int = 2, groups: int = 4) -> nn.Sequential:
    """A copy of the detector with a ULSAM block (g=``groups``) after layer ``at``."""
    import copy

    copied = copy.deepcopy(model)
    stage = copied[at]
    assert isinstance(stage, nn.Conv2d)
    copied[at] = WithULSAM(stage, stage.out_channels, groups)
    return copied.eval()
