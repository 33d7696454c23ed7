"""CUDA latency of the ULSAM block and of a retrofitted MobileNetV2, side by side.

Run on a machine with a GPU: ``PYTHONPATH=. python benchmarks/bench_cuda.py`` (about 2-3
minutes on one H200; ``--no-compile`` skips the torch.compile columns and most of that).

Block rows time, interleaved round by round with CUDA events (medians, ms per call):

- ``default``: ``block(x)``, whatever path :func:`ulsam_inject.block.dispatch.choose_path`
  takes there (printed in the ``path`` column);
- ``plain``: :meth:`ULSAM.forward_plain`, the module-by-module ops;
- ``reference``: the per-subspace loop (:class:`ulsam_inject.block.reference.ReferenceULSAM`);
- ``SE``: squeeze-and-excitation r=16; ``x*2``: one elementwise pass, the floor;
- ``compiled`` / ``SE comp.``: ``torch.compile`` of the block and of SE (a few rows).

``eval`` rows run under ``torch.no_grad()``; ``train`` rows time forward + backward. Model
rows compare torchvision's MobileNetV2 with the same model after ``inject`` at
``features.13,features.16`` (g=4): eval latency at batch 1 and 256, and images/s of a
training step (SGD, autocast bf16, channels_last). ``kernels`` counts the CUDA kernels one
eval call of the block launches at batch 1 (launch-bound there). ``--json FILE`` writes
every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from bench_block import SqueezeExcite, Times2, runner
from torch import nn

from ulsam_inject import ULSAM, inject
from ulsam_inject.block.dispatch import choose_path
from ulsam_inject.block.inference import fold_sources
from ulsam_inject.block.reference import ReferenceULSAM

DEVICE = "cuda"  # a module constant so that a CPU smoke run can stand in for the GPU


@dataclass(frozen=True)
class Case:
    mode: str  # "eval" or "train"
    shape: tuple[int, int, int, int]
    dtype: torch.dtype = torch.float32
    compiled: bool = False

    @property
    def label(self) -> str:
        kind = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"{self.mode:5s} {kind} {'x'.join(map(str, self.shape))}"


CASES = [
    Case("eval", (1, 512, 14, 14)),
    Case("eval", (32, 512, 14, 14)),
    Case("eval", (128, 96, 14, 14)),
    Case("eval", (128, 512, 14, 14), compiled=True),
    Case("eval", (128, 1280, 7, 7)),
    Case("eval", (128, 160, 7, 7)),
    Case("eval", (256, 144, 56, 56)),
    Case("eval", (1, 512, 14, 14), torch.bfloat16),
    Case("eval", (32, 512, 14, 14), torch.bfloat16),
    Case("eval", (128, 512, 14, 14), torch.bfloat16, compiled=True),
    Case("train", (32, 512, 14, 14)),
    Case("train", (128, 512, 14, 14)),
    Case("train", (128, 160, 7, 7)),
    Case("train", (128, 512, 14, 14), torch.bfloat16, compiled=True),
]


def cuda_measure(
    fns: dict[str, Callable[[], None]], rounds: int, target_ms: float
) -> dict[str, float]:
    """Median ms per call of each function: CUDA events around back-to-back calls, the
    functions interleaved round by round."""
    for fn in fns.values():  # warm up (and compile)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = (time.perf_counter() - start) * 1e3
        calls[name] = max(1, min(500, int(target_ms / max(once, 1e-3))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(rounds):
        names = list(fns)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order
        for name in names:
            fn = fns[name]
            begin.record()
            for _ in range(calls[name]):
                fn()
            end.record()
            end.synchronize()
            samples[name].append(begin.elapsed_time(end) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


class Plain(nn.Module):
    """The block's plain ops as a module, so ``runner`` can time them."""

    def __init__(self, block: ULSAM) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward_plain(x)


def count_kernels(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def bench_block(case: Case, rounds: int, compile_too: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    b, c, h, w = case.shape
    x = torch.randn(b, c, h, w, device=DEVICE, dtype=case.dtype)
    ref = ReferenceULSAM(c, 4).to(DEVICE).to(case.dtype)
    block = ULSAM.from_reference_state_dict(ref.state_dict()).to(DEVICE).to(case.dtype)
    block.train(case.mode == "train")
    with torch.set_grad_enabled(case.mode == "train"):
        probe = x.requires_grad_(case.mode == "train")
        path = choose_path(block, probe, fold_sources(block)).value
    x = x.detach()
    fns = {
        "default": runner(block, x, case.mode),
        "plain": runner(Plain(block), x, case.mode),
        "reference": runner(ref, x, case.mode),
        "SE": runner(SqueezeExcite(c).to(DEVICE).to(case.dtype), x, case.mode),
        "x*2": runner(Times2(), x, case.mode),
    }
    if case.compiled and compile_too:
        fns["compiled"] = runner(
            torch.compile(
                ULSAM.from_reference_state_dict(ref.state_dict()).to(DEVICE).to(case.dtype)
            ),
            x,
            case.mode,
        )
        fns["SE comp."] = runner(
            torch.compile(SqueezeExcite(c).to(DEVICE).to(case.dtype)), x, case.mode
        )
    times = cuda_measure(fns, rounds, target_ms=2.0)
    row: dict[str, Any] = {"case": case.label, "path": path, **times}
    if b == 1 and case.mode == "eval":
        row["kernels"] = count_kernels(fns["default"])
        row["kernels plain"] = count_kernels(fns["plain"])
        row["kernels SE"] = count_kernels(fns["SE"])
    return row


def mobilenets(size: int = 224) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v2().eval()
    retrofit = inject(original, at=["features.13", "features.16"], input_size=(3, size, size)).model
    return original.to(DEVICE), retrofit.to(DEVICE)


def bench_models(rounds: int, compile_too: bool) -> list[dict[str, Any]]:
    rows = []
    original, retrofit = mobilenets()
    settings = [
        ("eval fp32 batch 1", 1, torch.float32, False),
        ("eval fp32 batch 256", 256, torch.float32, False),
        ("eval bf16 channels_last batch 256", 256, torch.bfloat16, True),
    ]
    for label, batch, dtype, channels_last in settings:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        models = {
            "original": original.to(dtype=dtype, memory_format=fmt).eval(),
            "retrofit": retrofit.to(dtype=dtype, memory_format=fmt).eval(),
        }
        x = torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=dtype).contiguous(
            memory_format=fmt
        )
        fns = {name: runner(m, x, "eval") for name, m in models.items()}
        if compile_too and batch == 256 and dtype == torch.bfloat16:
            fns["original compiled"] = runner(torch.compile(models["original"]), x, "eval")
            fns["retrofit compiled"] = runner(torch.compile(models["retrofit"]), x, "eval")
        times = cuda_measure(fns, rounds, target_ms=20.0)
        rows.append({"case": label, **times})
    original, retrofit = (
        m.float().to(memory_format=torch.channels_last) for m in (original, retrofit)
    )
    rows.append(
        {
            "case": "train step autocast bf16 channels_last batch 256 (images/s)",
            **train_throughput(original, retrofit, rounds),
        }
    )
    return rows


def train_throughput(original: nn.Module, retrofit: nn.Module, rounds: int) -> dict[str, float]:
    batch = 256
    x = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=DEVICE)

    def step_fn(model: nn.Module) -> Callable[[], None]:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()

        return step

    times = cuda_measure(
        {"original": step_fn(original), "retrofit": step_fn(retrofit)}, rounds, target_ms=50.0
    )
    return {name: batch / (ms / 1e3) for name, ms in times.items()}


def fmt(value: Any, width: int = 9) -> str:
    if value is None:
        return f"{'-':>{width}s}"
    if isinstance(value, float):
        return f"{value:{width}.3f}" if value < 1000 else f"{value:{width}.0f}"
    return f"{value!s:>{width}s}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile columns")
    parser.add_argument("--no-models", action="store_true", help="block rows only")
    parser.add_argument("--json", type=str, default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    print(
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}, g=4, medians of {args.rounds} rounds, ms"
    )
    compile_warnings: list[str] = []
    block_rows = []
    columns = ["path", "default", "plain", "reference", "SE", "x*2", "compiled", "SE comp."]
    print("| case | " + " | ".join(columns) + " | default/plain | default/SE |")
    print("|" + "---|" * (len(columns) + 3))
    for case in CASES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = bench_block(case, args.rounds, not args.no_compile)
        compile_warnings += [f"{case.label}: {w.category.__name__}: {w.message}" for w in caught]
        block_rows.append(row)
        ratios = f"{row['default'] / row['plain']:.2f} | {row['default'] / row['SE']:.2f}"
        print(
            f"| {row['case']} | "
            + " | ".join(fmt(row.get(k)).strip() for k in columns)
            + f" | {ratios} |",
            flush=True,
        )
    for row in block_rows:
        if "kernels" in row:
            print(
                f"kernels per eval call at {row['case']}: default {row['kernels']}, "
                f"plain {row['kernels plain']}, SE {row['kernels SE']}"
            )
    model_rows: list[dict[str, Any]] = []
    if not args.no_models:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model_rows = bench_models(args.rounds, not args.no_compile)
        compile_warnings += [f"models: {w.category.__name__}: {w.message}" for w in caught]
        print(
            "\n| MobileNetV2 | original | retrofit | retrofit/original "
            "| compiled: original | retrofit | ratio |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in model_rows:
            ratio = row["retrofit"] / row["original"]
            comp = (
                ("original compiled" in row)
                and (
                    f"{row['original compiled']:.3f} | {row['retrofit compiled']:.3f} | "
                    f"{row['retrofit compiled'] / row['original compiled']:.3f}"
                )
            ) or "- | - | -"
            print(
                f"| {row['case']} | {fmt(row['original']).strip()} "
                f"| {fmt(row['retrofit']).strip()} | {ratio:.3f} | {comp} |"
            )
    for line in sorted(set(compile_warnings)):
        print("warning seen:", line[:300], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "blocks": block_rows,
                    "models": model_rows,
                    "warnings": sorted(set(compile_warnings)),
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
