"""The README's heat-map figure: a planted object, a plain CNN and one with ULSAM.

Nothing is downloaded: two small CNNs are trained here, in about half a minute on a CPU,
to tell noise with a bright square (class "square") from noise alone ("noise"); the second
has a ULSAM block (g=4) after its third convolution. ``ulsam_inject.heatmaps`` then draws,
for three held-out images, each model's Grad-CAM++ map and the ULSAM block's four
attention maps, and prints each map's peak and concentration.

Run: .venv/bin/python examples/explain_planted.py [--out docs/explain_example.png]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from PIL import Image
from torch import nn

from ulsam_inject import ULSAM, explain
from ulsam_inject.train.data import DataConfig

SIZE, SQUARE = 48, 10
CONFIG = DataConfig((3, SIZE, SIZE), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=1.0)
NAMES = ["noise", "square"]


def picture(rng: np.random.Generator, corner: tuple[int, int] | None) -> np.ndarray:
    """Grey noise in [0, 0.6]; with ``corner``, a white SQUARE x SQUARE square there.

    (Grey: coloured noise makes a PNG twice as large.)
    """
    pixels = rng.uniform(0.0, 0.6, size=(SIZE, SIZE, 1)).repeat(3, axis=2)
    if corner is not None:
        top, left = corner
        pixels[top : top + SQUARE, left : left + SQUARE] = 1.0
    return pixels


class WithULSAM(nn.Module):
    def __init__(self, stage: nn.Module, channels: int, groups: int) -> None:
        super().__init__()
        self.stage = stage
        self.ulsam = ULSAM(channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.ulsam(self.stage(x))
        return out


def cnn(with_ulsam: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    ]
    model = nn.Sequential(*layers)
    if with_ulsam:
        model[4] = WithULSAM(copy.deepcopy(model[4]), 32, 4)
    return model


def train(model: nn.Module, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        labels = rng.integers(0, 2, size=32)
        batch = [
            picture(rng, tuple(rng.integers(0, SIZE - SQUARE + 1, size=2)) if y else None)
            for y in labels
        ]
        x = (torch.tensor(np.stack(batch), dtype=torch.float32).permute(0, 3, 1, 2) - 0.5) / 0.5
        loss = nn.functional.cross_entropy(model(x), torch.tensor(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/explain_example.png")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dpi", type=int, default=70, help="70: the PNG stays under 300 kB")
    args = parser.parse_args()
    models = {
        "plain CNN": train(cnn(False), args.steps, seed=0),
        "CNN + ULSAM (g=4)": train(cnn(True), args.steps, seed=0),
    }
    rng = np.random.default_rng(2024)
    images = [
        Image.fromarray(np.round(picture(rng, corner) * 255).astype(np.uint8))
        for corner in [(6, 30), (30, 8), (20, 19)]
    ]
    result = explain(models, images, config=CONFIG, class_names=NAMES, attention=True)
    for found in result.maps:
        print(
            f"{found.image}  {found.model:18s} {found.target.name} "
            f"{100 * found.target.probability:5.1f}%  peak (row, col) {found.stats.peak}  "
            f"top-10% mass {100 * (found.stats.top10_mass or 0):.0f}%"
        )
    print(f"wrote {result.save(args.out, force=True, dpi=args.dpi)}")


if __name__ == "__main__":
    main()
