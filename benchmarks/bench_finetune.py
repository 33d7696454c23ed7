"""Images/s of a fine-tuning step: MobileNetV2 + 2 ULSAM vs the original, side by side.

A step is what ``ulsam-inject finetune`` does in its all-parameters phase: forward in train
mode, cross-entropy, backward, AdamW step. ULSAM goes after ``features.13`` and
``features.16`` (g = 4). The two models are timed interleaved (original, retrofitted,
original, ...) after warm-up steps, on the same random batch; medians over the steps.
On CUDA (when available, ``--device auto``) the steps run as ``finetune`` runs them there:
bf16 autocast (where supported) and channels_last.

Usage::

    PYTHONPATH=. python benchmarks/bench_finetune.py                     # CPU, batch 8, 224 px
    PYTHONPATH=. python benchmarks/bench_finetune.py --batch 16 --steps 10 --threads 2
    PYTHONPATH=. python benchmarks/bench_finetune.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torchvision
from torch import nn

from ulsam_inject import inject

POSITIONS = ["features.13", "features.16"]


def step_fn(model: nn.Module, device: torch.device, batch: int, size: int) -> object:
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    channels_last = device.type == "cuda"
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        context = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with context:
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v2()
    retrofitted = inject(original, at=POSITIONS, groups=4, report=False).model
    steps = {
        "original": step_fn(original, device, args.batch, args.size),
        "+2 ULSAM": step_fn(retrofitted, device, args.batch, args.size),
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()  # type: ignore[operator]
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(args.steps):
        for key, step in steps.items():
            times[key].append(step())  # type: ignore[operator]
    print(
        f"MobileNetV2 fine-tuning step (train fwd + bwd + AdamW), {device}, batch {args.batch}, "
        f"{args.size} px, {args.threads} threads, median of {args.steps} interleaved steps"
    )
    print(f"{'model':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'images/s':>9}")
    rates = {}
    for key, samples in times.items():
        ordered = sorted(samples)
        median = statistics.median(ordered)
        rates[key] = args.batch / median
        p10 = ordered[int(0.1 * (len(ordered) - 1))]
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(
            f"{key:<10} {1000 * median:>10.1f} {1000 * p10:>8.1f} {1000 * p90:>8.1f} "
            f"{rates[key]:>9.1f}"
        )
    print(f"images/s ratio (+2 ULSAM / original): {rates['+2 ULSAM'] / rates['original']:.3f}")


if __name__ == "__main__":
    main()
