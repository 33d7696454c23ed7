"""Where the ULSAM block's CPU time goes: a per-op profile and the memory floor.

Run: ``PYTHONPATH=. python benchmarks/profile_block.py`` (float32, 2 threads, g=4; about
a minute). For each case (eval at 1x512x14x14 and 32x512x14x14, train forward + backward
at 32x512x14x14 and 32x160x7x7) it prints:

- the block's median ms per call, timed interleaved with ``x * 2`` (one elementwise pass:
  reads the activation once and writes it once, at the machine's real bandwidth);
- the floor: the bytes any block must move over the bytes ``x * 2`` moves, times its
  time. Eval must read x and write the output: exactly ``x * 2``'s traffic, so the floor
  is 1 pass. Training must also read the output's gradient and x again and write x's
  gradient in the backward: 2.5 passes. Everything else the block touches (its weights,
  the (B, g, H, W) attention) is under 1% of that;
- torch.profiler's per-op self time per call, largest first, with the input shapes, so
  that each remaining pass over memory and its cost can be read off.

Every figure varies with the load on the machine: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from ulsam_inject.block.module import ULSAM

CASES = [
    ("eval", (1, 512, 14, 14)),
    ("eval", (32, 512, 14, 14)),
    ("train", (32, 512, 14, 14)),
    ("train", (32, 160, 7, 7)),
]

FLOOR_PASSES = {"eval": 1.0, "train": 2.5}
"""Elementwise passes (read once, write once) a block must make at the least."""


def step(block: ULSAM, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One eval forward under no_grad, or one train forward + backward."""
    if mode == "eval":
        block.eval()

        def run_eval() -> None:
            with torch.no_grad():
                block(x)

        return run_eval
    block.train()
    inp = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    def run_train() -> None:
        inp.grad = None
        block.zero_grad(set_to_none=True)
        block(inp).backward(grad)

    return run_train


def medians(fns: dict[str, Callable[[], None]], seconds: float) -> dict[str, float]:
    """Median ms per call of each function, interleaved call by call."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or min(map(len, samples.values())) < 5:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def profile_ops(fn: Callable[[], None], calls: int, rows: int) -> list[str]:
    """The ``rows`` ops with the most self time, in ms per call of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    events = sorted(
        prof.key_averages(group_by_input_shape=True),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    total = sum(e.self_cpu_time_total for e in events) / calls / 1e3
    lines = [f"    profiled self time: {total:.3f} ms per call (profiler overhead included)"]
    for e in events[:rows]:
        shapes = ", ".join(str(tuple(s)) for s in e.input_shapes if s)[:70]
        ms = e.self_cpu_time_total / calls / 1e3
        lines.append(f"    {ms:8.3f} ms {e.count // calls:4d}x  {e.key:40s} {shapes}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing per case")
    parser.add_argument("--rows", type=int, default=12, help="ops shown per case")
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load:.2f}")
    for mode, shape in CASES:
        torch.manual_seed(0)
        x = torch.randn(shape)
        block = ULSAM(shape[1], args.groups)
        fn = step(block, x, mode)
        ms = medians({"ULSAM": fn, "x*2": lambda x=x: x * 2}, args.seconds)
        floor = FLOOR_PASSES[mode] * ms["x*2"]
        megabytes = x.numel() * x.element_size() / 2**20
        print(
            f"\n{mode} {'x'.join(map(str, shape))} g={args.groups} ({megabytes:.1f} MiB): "
            f"ULSAM {ms['ULSAM']:.3f} ms, x*2 {ms['x*2']:.3f} ms "
            f"({2 * megabytes / ms['x*2']:.1f} GiB/s); floor {FLOOR_PASSES[mode]:g} pass = "
            f"{floor:.3f} ms; ULSAM / floor = {ms['ULSAM'] / floor:.1f}"
        )
        calls = max(3, min(200, int(1.0 / max(ms["ULSAM"] / 1e3, 1e-6))))
        print("\n".join(profile_ops(fn, calls, args.rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
