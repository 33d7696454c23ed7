"""ONNX latency of MobileNetV2 with ULSAM vs the original, both exported, in onnxruntime (CPU).

ULSAM goes after ``features.13`` and ``features.16`` (g = 4), as in bench_models.py. Both
models are exported with :func:`ulsam_inject.export_onnx` (opset 20, dynamic batch) once,
then run in onnxruntime's CPU provider with the same thread count. For each batch the two
sessions are timed interleaved (original, retrofit, original, ...) after a warm-up, so a
busy machine slows both alike; the table shows each median and the retrofit's over the
original's. ``max |diff|`` is the largest absolute difference of each ONNX output from
the torch model it was exported from (eval mode, same input); ``max |output|`` gives the
scale.

Models are built without weights (random init), fp32; their batch-norm statistics are then
computed from random images (``calibrate``), as training would leave them: with default
statistics a weightless MobileNetV2 outputs about 1e-9, and every difference looks tiny.

Usage::

    PYTHONPATH=. python benchmarks/bench_onnx.py                 # batch 1 and 32, 2 threads
    PYTHONPATH=. python benchmarks/bench_onnx.py --batches 1 --repeats 50 --threads 1 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from ulsam_inject import export_onnx, inject

POSITIONS = ("features.13", "features.16")


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds per run of each session, runs alternating between them."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(warmup + repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"input": x})
            if step >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def max_diff(s: ort.InferenceSession, model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """The largest |ONNX - torch| and, for scale, the largest |torch output|."""
    (y,) = s.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    return float((torch.from_numpy(y) - expected).abs().max()), float(expected.abs().max())


def calibrate(model: nn.Module, size: tuple[int, int, int]) -> None:
    """Every batch norm's statistics from two random batches of 8 (cumulative average)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(8, *size, generator=torch.Generator().manual_seed(seed)))
    model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batches", default="1,32", help="comma-separated (default 1,32)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model first")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--groups", type=int, default=4, help="g of every ULSAM")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (3, args.size, args.size)

    torch.manual_seed(0)
    original = torchvision.models.mobilenet_v2(weights=None).eval()
    retrofit = inject(
        original, at=",".join(POSITIONS), groups=args.groups, input_size=size, report=False
    )
    calibrate(original, size)
    calibrate(retrofit.model, size)  # its own copy of the weights; stages see ULSAM's output
    models: dict[str, nn.Module] = {"original": original, "ULSAM": retrofit.model}
    with tempfile.TemporaryDirectory() as folder:
        paths = {
            "original": export_onnx(original, Path(folder) / "original.onnx", input_size=size),
            "ULSAM": export_onnx(retrofit, Path(folder) / "ulsam.onnx"),
        }
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        rows: list[dict[str, Any]] = []
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))
            times = interleaved(sessions, x.numpy(), args.repeats, args.warmup)
            medians = {name: statistics.median(t) for name, t in times.items()}
            diff_original, _ = max_diff(sessions["original"], models["original"], x)
            diff_ulsam, scale = max_diff(sessions["ULSAM"], models["ULSAM"], x)
            rows.append(
                {
                    "batch": batch,
                    "threads": args.threads,
                    "original_ms": medians["original"],
                    "ulsam_ms": medians["ULSAM"],
                    "ratio": medians["ULSAM"] / medians["original"],
                    "max_diff_original": diff_original,
                    "max_diff_ulsam": diff_ulsam,
                    "max_abs_output_ulsam": scale,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(
        title=f"MobileNetV2 {args.size}x{args.size} in onnxruntime (CPU, {args.threads} "
        f"threads), ULSAM g={args.groups} after {', '.join(POSITIONS)}; "
        f"medians of {args.repeats}, interleaved"
    )
    for column in (
        "batch",
        "original ms",
        "ULSAM ms",
        "ratio",
        "max |diff| original",
        "max |diff| ULSAM",
        "max |output| ULSAM",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["batch"]),
            f"{row['original_ms']:.2f}",
            f"{row['ulsam_ms']:.2f}",
            f"{row['ratio']:.3f}",
            f"{row['max_diff_original']:.1e}",
            f"{row['max_diff_ulsam']:.1e}",
            f"{row['max_abs_output_ulsam']:.1f}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
