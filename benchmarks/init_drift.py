"""How far a trained model's predictions move when ULSAM blocks are inserted, per init.

No pretrained weights can be downloaded here, so the script makes a pretrained-like model
itself: a small MobileNetV2 trained for a few hundred steps on generated images (8 classes:
4 shapes x 2 stripe orientations, random colours, positions, sizes and noise). It then
inserts ULSAM after ``--at`` (paper-like: features.13 and features.16) with each init and
compares, on held-out images, eval mode: top-1 agreement with the original, the KL
divergence of the softmax outputs (original || retrofitted), the relative change of the
logits (||z' - z|| / ||z||, mean over images) and top-1 accuracy. The default init is
random, so it is measured for ``--seeds`` block seeds (mean, and worst in brackets).

Run: .venv/bin/python benchmarks/init_drift.py [--steps 200 --batch 32] [--cache FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ulsam_inject import inject
from ulsam_inject.block.module import INITS

CLASSES = 8


def make_images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 3, size, size) and labels: shape (4) x stripe orientation (2)."""
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    shape, vertical = labels // 2, labels % 2

    def uniform(low: float, high: float, *dims: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *dims, generator=generator)

    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = axis.view(1, size, 1), axis.view(1, 1, size)
    cx, cy = uniform(-0.4, 0.4, 1, 1), uniform(-0.4, 0.4, 1, 1)
    radius = uniform(0.45, 0.7, 1, 1)
    dx, dy = (xx - cx).abs(), (yy - cy).abs()
    distance = (dx**2 + dy**2).sqrt()
    masks = torch.stack(
        [
            distance < radius,  # disc
            torch.maximum(dx, dy) < radius * 0.85,  # square
            (distance < radius) & (distance > radius * 0.55),  # ring
            ((dx < radius * 0.3) & (dy < radius)) | ((dy < radius * 0.3) & (dx < radius)),  # cross
        ],
        dim=1,
    )
    mask = masks[torch.arange(n), shape].float()
    period = uniform(size / 10, size / 6, 1, 1)
    pixel = torch.arange(size, dtype=torch.float32)
    rows = torch.sin(2 * math.pi * pixel.view(1, size, 1) / period).expand(n, size, size)
    cols = torch.sin(2 * math.pi * pixel.view(1, 1, size) / period).expand(n, size, size)
    stripes = (torch.where(vertical.view(n, 1, 1).bool(), cols, rows) > 0).float()
    foreground = uniform(0.4, 1.0, 3, 1, 1) * (0.35 + 0.65 * stripes.unsqueeze(1))
    background = uniform(0.0, 0.6, 3, 1, 1)
    image = background + mask.unsqueeze(1) * (foreground - background)
    image = image + 0.08 * torch.randn(n, 3, size, size, generator=generator)
    return (image - 0.5) / 0.25, labels


def train(size: int, steps: int, batch: int, width: float) -> tuple[nn.Module, float]:
    """A MobileNetV2 trained on generated images: it (eval mode), last-50-batch accuracy."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=CLASSES, width_mult=width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    net.train()
    correct: list[float] = []
    for _ in range(steps):
        images, labels = make_images(batch, size, generator)
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        correct.append((logits.argmax(1) == labels).float().mean().item())
    return net.eval(), sum(correct[-50:]) / len(correct[-50:])


@torch.no_grad()
def drift(
    original: nn.Module, retrofitted: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Agreement %, KL, relative logit change and accuracies of ``retrofitted`` vs ``original``."""
    z0, z1 = original(images), retrofitted.eval()(images)
    log_p0, log_p1 = F.log_softmax(z0, 1), F.log_softmax(z1, 1)
    return {
        "agreement": 100.0 * (z0.argmax(1) == z1.argmax(1)).float().mean().item(),
        "kl": (log_p0.exp() * (log_p0 - log_p1)).sum(1).mean().item(),
        "logit_change": ((z1 - z0).norm(dim=1) / z0.norm(dim=1)).mean().item(),
        "accuracy": 100.0 * (z1.argmax(1) == labels).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--width", type=float, default=0.5, help="MobileNetV2 width_mult")
    parser.add_argument("--at", default="features.13,features.16", help="positions")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5, help="block seeds per init")
    parser.add_argument("--heldout", type=int, default=2000, help="held-out images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--eval-sizes",
        default="64,128",
        help="held-out image sides (the model is convolutional)",
    )
    parser.add_argument(
        "--cache", default=None, help="save the trained model here; reuse it if there"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.cache and os.path.exists(args.cache):
        net = torchvision.models.mobilenet_v2(num_classes=CLASSES, width_mult=args.width)
        net.load_state_dict(torch.load(args.cache))
        net.eval()
        trained = f"loaded from {args.cache}"
    else:
        net, train_accuracy = train(args.size, args.steps, args.batch, args.width)
        trained = (
            f"trained {args.steps} steps of {args.batch} in {time.perf_counter() - start:.0f} s "
            f"(last-50-batch train accuracy {100 * train_accuracy:.1f}%)"
        )
        if args.cache:
            torch.save(net.state_dict(), args.cache)
    at = args.at.split(",")
    print(
        f"MobileNetV2 width {args.width}, {CLASSES} classes (chance {100 / CLASSES:.1f}%), "
        f"trained at {args.size}x{args.size} px: {trained}"
    )
    print(f"ULSAM (g={args.groups}) after {', '.join(at)}; block seeds 0..{args.seeds - 1}")
    for side in (int(v) for v in args.eval_sizes.split(",")):
        images, labels = make_images(args.heldout, side, torch.Generator().manual_seed(12345))
        report(net, images, labels, at, args.groups, args.seeds)


def report(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    at: list[str],
    groups: int,
    seeds: int,
) -> None:
    """One table: each init's drift on ``images`` (mean over block seeds, worst in brackets)."""
    side = images.shape[-1]
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_module: nn.Module, _inputs: object, out: torch.Tensor) -> None:
            shapes[name] = tuple(out.shape[1:])

        return hook

    hooks = [net.get_submodule(name).register_forward_hook(record(name)) for name in at]
    with torch.no_grad():
        accuracy = 100.0 * (net(images).argmax(1) == labels).float().mean().item()
    for hook in hooks:
        hook.remove()
    where = ", ".join(f"{'x'.join(map(str, shapes[name]))}" for name in at)
    print()
    print(f"held out: {len(images)} images at {side}x{side} px; maps at {', '.join(at)}: {where}")
    print(f"{'init':<10} {'agreement %':>16} {'KL':>20} {'logit change':>20} {'accuracy %':>16}")
    print(f"{'(none)':<10} {100.0:>16.1f} {0.0:>20.4f} {0.0:>20.4f} {accuracy:>16.1f}")
    size = (3, side, side)
    for init in INITS:
        rows = [
            drift(
                net,
                inject(
                    net, at=at, groups=groups, input_size=size, seed=s, init=init, report=False
                ).model,
                images,
                labels,
            )
            for s in range(seeds)
        ]

        def cell(key: str, digits: int, worst: str, rows: list[dict[str, float]] = rows) -> str:
            values = [row[key] for row in rows]
            mean = sum(values) / len(values)
            bad = min(values) if worst == "min" else max(values)
            return f"{mean:.{digits}f} ({bad:.{digits}f})"

        print(
            f"{init:<10} {cell('agreement', 1, 'min'):>16} {cell('kl', 4, 'max'):>20} "
            f"{cell('logit_change', 4, 'max'):>20} {cell('accuracy', 1, 'min'):>16}"
        )


if __name__ == "__main__":
    main()
