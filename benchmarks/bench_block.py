"""CPU latency of the ULSAM block against the per-subspace reference, an SE block and ``x * 2``.

Run: ``PYTHONPATH=. python benchmarks/bench_block.py`` (float32, 2 threads, about 2 minutes).

Every row times its candidates side by side in one process, interleaved round by round (so
a burst of load on the machine hits all of them alike), and reports medians in ms:

- ``reference``: :class:`ulsam_inject.block.reference.ReferenceULSAM`, the per-subspace loop;
- ``ULSAM``: the block in its default (eager) mode;
- ``compiled``: ``torch.compile(block)`` (inductor), for a few rows;
- ``SE``: squeeze-and-excitation, reduction 16 (avgpool, fc C/16, ReLU, fc C, sigmoid, scale);
- ``x*2``: one elementwise pass over the activation, the floor for any block on it.

``eval`` rows run under ``torch.no_grad()``; ``train`` rows time forward + backward of the
sum of the output times a fixed random tensor, with the input requiring grad. Ratios:
``ref/U`` is how many times faster ULSAM is than the reference (``ref/C`` compiled),
``U/SE`` and ``U/x2`` how many SE blocks or elementwise passes one ULSAM costs; the
targets of issue 14 are checked on the eager block.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ulsam_inject.block.module import ULSAM
from ulsam_inject.block.reference import ReferenceULSAM


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.): x * sigmoid(fc(relu(fc(avgpool(x)))))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * scale[:, :, None, None]


class Times2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@dataclass
class Case:
    mode: str  # "eval" or "train"
    shape: tuple[int, int, int, int]
    groups: int
    compiled: bool = False
    # column -> bound: "ULSAM" is a minimum of ref/U, "U/SE" and "U/x2" are maxima
    targets: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.mode:5s} {'x'.join(map(str, self.shape)):>13s} g={self.groups:<2d}"


# Targets of issue 14: at batch 1 at most 3.5 SE blocks (MobileNetV2's shapes, 512x14x14
# and 1280x7x7), at batch 32 at most 6 elementwise passes, training 4x the reference.
CASES = [
    Case("eval", (1, 512, 14, 14), 4, compiled=True, targets={"U/SE": 3.5}),
    Case("eval", (1, 96, 14, 14), 4, targets={"U/SE": 3.5}),
    Case("eval", (1, 160, 7, 7), 4, targets={"U/SE": 3.5}),
    Case("eval", (1, 1280, 7, 7), 4, targets={"U/SE": 3.5}),
    Case("eval", (32, 512, 14, 14), 4, compiled=True, targets={"U/x2": 6.0}),
    Case("train", (32, 160, 7, 7), 4, targets={"ULSAM": 4.0}),
    Case("train", (32, 512, 14, 14), 4, targets={"ULSAM": 4.0}),
    *[Case("eval", (1, 96, 14, 14), g) for g in (1, 16)],
    *[Case("eval", (32, 160, 7, 7), g) for g in (1, 4, 16)],
    *[Case("train", (1, 96, 14, 14), g) for g in (1, 4, 16)],
    *[Case("train", (32, 160, 7, 7), g) for g in (1, 16)],
]


def runner(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A no-argument callable running one eval forward or one train forward + backward."""
    if mode == "eval":
        module.eval()

        def run_eval() -> None:
            with torch.no_grad():
                module(x)

        return run_eval
    module.train()
    inp = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    def run_train() -> None:
        inp.grad = None
        module.zero_grad(set_to_none=True)
        module(inp).backward(grad)

    return run_train


def measure(fns: dict[str, Callable[[], None]], rounds: int, budget: float) -> dict[str, float]:
    """Median ms per call of each function, interleaved over ``rounds`` rounds."""
    for fn in fns.values():  # warm up (and compile)
        for _ in range(3):
            fn()
    per_round: dict[str, int] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        per_round[name] = max(1, min(200, int(budget / rounds / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round[name]):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def bench_case(case: Case, rounds: int, budget: float, compile_too: bool) -> dict[str, float]:
    torch.manual_seed(0)
    b, c, h, w = case.shape
    x = torch.randn(b, c, h, w)
    ref = ReferenceULSAM(c, case.groups)
    block = ULSAM.from_reference_state_dict(ref.state_dict())
    fns = {
        "reference": runner(ref, x, case.mode),
        "ULSAM": runner(block, x, case.mode),
    }
    if case.compiled and compile_too:
        fns["compiled"] = runner(
            torch.compile(ULSAM.from_reference_state_dict(ref.state_dict())), x, case.mode
        )
    fns["SE"] = runner(SqueezeExcite(c), x, case.mode)
    fns["x*2"] = runner(Times2(), x, case.mode)
    return measure(fns, rounds, budget)


def fmt(value: float | None, width: int = 8, digits: int = 3) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per row")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per candidate and row")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--only", default="", help="run only rows whose label contains this")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.2f} at start"
    )
    header = (
        f"{'case':26s} {'reference':>9s} {'ULSAM':>8s} {'compiled':>8s} {'SE':>8s} {'x*2':>8s}"
        f" {'ref/U':>6s} {'ref/C':>6s} {'U/SE':>6s} {'U/x2':>6s}  targets"
    )
    print("median ms per call; eval = forward under no_grad, train = forward + backward")
    print(header)
    print("-" * len(header))
    misses = 0
    for case in CASES:
        if args.only and args.only not in case.label:
            continue
        ms = bench_case(case, args.rounds, args.budget, not args.no_compile)
        ref = ms["reference"]
        ratio = {name: ref / value for name, value in ms.items()}
        verdicts = []
        for name, bound in case.targets.items():
            if name in ("U/SE", "U/x2"):
                ok = ms["ULSAM"] / ms[name[2:].replace("x2", "x*2")] <= bound
                label = f"{name} <= {bound:g}"
            else:
                ok = ratio[name] >= bound
                label = f"ref/U >= {bound:g}x"
            misses += not ok
            verdicts.append(f"{label}: {'met' if ok else 'MISSED'}")
        print(
            f"{case.label:26s} {fmt(ref, 9)} {fmt(ms['ULSAM'])} {fmt(ms.get('compiled'))}"
            f" {fmt(ms['SE'])} {fmt(ms['x*2'])} {fmt(ratio['ULSAM'], 6, 1)}"
            f" {fmt(ratio.get('compiled'), 6, 1)} {fmt(ms['ULSAM'] / ms['SE'], 6, 1)}"
            f" {fmt(ms['ULSAM'] / ms['x*2'], 6, 1)}  {'; '.join(verdicts)}",
            flush=True,
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at end; {misses} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
