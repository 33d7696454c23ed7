"""Latency of the original and the retrofitted model, measured side by side.

MAC counts hide what ULSAM costs (a max-pool, a softmax, elementwise passes); latency shows
it. Both models run on the same input, interleaved (A B, B A, ...) after a warm-up, so
that drift of clocks and caches hits both alike; we report medians and the 10th-90th
percentile spread, and the ratio of medians.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ulsam_inject.errors import ResourceLimitError, UlsamUsageError
from ulsam_inject.graph.modes import eval_mode
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, check_input_size
from ulsam_inject.guards import check_input_limits

SCHEMA = "ulsam-inject.bench/1"
ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each timed pair; the CLI draws a bar with it."""


@dataclass(frozen=True)
class Timing:
    """Latency of one model, milliseconds per forward pass of one batch."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int


@dataclass(frozen=True)
class LatencyReport:
    """Side-by-side latency: ``after.median_ms / before.median_ms`` is the ratio."""

    device: str
    threads: int
    batch: int
    input_size: tuple[int, int, int]
    before: Timing
    after: Timing

    @property
    def ratio(self) -> float:
        return self.after.median_ms / self.before.median_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``schema`` ("ulsam-inject.bench/1"), the fields, and ``ratio``."""
        data = {"schema": SCHEMA, **asdict(self)}
        data["input_size"] = list(self.input_size)
        data["ratio"] = self.ratio
        return data


def _timing(samples: list[float]) -> Timing:
    ordered = sorted(samples)
    n = len(ordered)
    return Timing(
        median_ms=statistics.median(ordered) * 1e3,
        p10_ms=ordered[int(0.1 * (n - 1))] * 1e3,
        p90_ms=ordered[int(0.9 * (n - 1))] * 1e3,
        samples=n,
    )


@contextmanager
def _threads(count: int | None) -> Iterator[int]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def measure_latency(
    before: nn.Module,
    after: nn.Module,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    batch: int = 1,
    device: str = "auto",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
    progress: ProgressCallback | None = None,
) -> LatencyReport:
    """Time ``before`` and ``after`` in eval mode, no grad, interleaved; returns medians.

    ``device`` is ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``; ``threads`` sets torch's CPU threads for the measurement. The models are
    moved to ``device`` as copies only if they are not there already: the caller's models
    are put in eval mode for the measurement and restored afterwards.

    Example:
        >>> import torchvision
        >>> from ulsam_inject import inject
        >>> net = torchvision.models.mobilenet_v2()
        >>> result = inject(net, at="features.13")
        >>> report = measure_latency(net, result.model, (3, 64, 64), warmup=1, repeats=3)
        >>> report.ratio > 0
        True
    """
    if batch < 1 or repeats < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise UlsamUsageError(
            f"batch, repeats and threads must be >= 1 and warmup >= 0; got batch={batch}, "
            f"repeats={repeats}, threads={threads}, warmup={warmup}"
        )
    check_input_size(input_size)
    check_input_limits(input_size)
    input_size = (int(input_size[0]), int(input_size[1]), int(input_size[2]))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UlsamUsageError(
            f"device {device!r} is not one torch knows: auto, cpu, cuda, cuda:N"
        ) from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UlsamUsageError(f"device {device!r} asked for, but CUDA is not available here")
    if target.type not in ("cpu", "cuda"):
        raise UlsamUsageError(f"device {device!r}: only cpu and cuda are supported")
    dtype = next((p.dtype for p in before.parameters() if p.is_floating_point()), torch.float32)
    samples: list[list[float]] = [[], []]
    with eval_mode(before), eval_mode(after):
        runnable = [_on_device(m, target) for m in (before, after)]
        # Memory is checked on one sample before a whole batch is allocated; the one-sample
        # run is skipped where even a generous bound (activations of 256 inputs) fits.
        input_bytes = torch.empty((), dtype=dtype).element_size() * math.prod(input_size)
        available = available_memory(target)
        if available is not None and batch * input_bytes * _GENEROUS > available:
            per_sample = max(_sample_bytes(m, input_size, dtype, target) for m in runnable)
            check_batch_memory(batch, per_sample, input_size, target)
        # A seeded generator of our own: the same input every call, the caller's RNG untouched.
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(batch, *input_size, generator=generator, dtype=dtype).to(target)
        with _threads(threads) as used, torch.inference_mode():
            for _ in range(warmup):
                for model in runnable:
                    model(example)
            for i in range(repeats):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                for which in order:
                    samples[which].append(_time_once(runnable[which], example, target))
                if progress is not None:
                    progress(i + 1, repeats)
    return LatencyReport(
        device=_device_name(target),
        threads=used,
        batch=batch,
        input_size=input_size,
        before=_timing(samples[0]),
        after=_timing(samples[1]),
    )


_GENEROUS = 256
"""Activation bytes per input byte below which a batch is not checked further."""


def check_batch_memory(
    batch: int, per_sample: int, input_size: tuple[int, int, int], device: torch.device
) -> None:
    """Refuse a batch whose activations alone clearly exceed the memory available.

    ``per_sample`` is a lower bound of one sample's activation bytes (see
    :func:`_sample_bytes`); raises :class:`ResourceLimitError` with the estimate.
    """
    needed = batch * per_sample
    available = available_memory(device)
    if available is None or needed <= available:
        return
    size = "x".join(map(str, input_size))
    raise ResourceLimitError(
        f"batch {batch} at {size} needs at least {_gib(needed)} of activations "
        f"({per_sample / 2**20:.2f} MiB per sample: the input and the largest layer's input "
        f"and output), more than the {_gib(available)} available on {device.type}; use a "
        f"batch of at most {max(1, available // max(per_sample, 1))}"
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (the CPU: RAM, within a cgroup limit)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            found.append(max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return min(found)


def _sample_bytes(
    model: nn.Module, input_size: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> int:
    """A lower bound of one sample's activation bytes: the input, plus the largest input +
    output of any one leaf module, measured with forward hooks on one sample."""
    largest = 0

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal largest
        largest = max(largest, _nbytes(inputs) + _nbytes(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    example = torch.zeros(1, *input_size, dtype=dtype, device=device)
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return example.nbytes + largest


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _gib(count: int) -> str:
    return f"{count / 2**30:.1f} GiB"


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    current = next((p.device for p in model.parameters()), torch.device("cpu"))
    if current == device:
        return model
    import copy

    return copy.deepcopy(model).to(device)


def _time_once(model: nn.Module, example: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        model(example)
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end)) / 1e3
    begin = time.perf_counter()
    model(example)
    return time.perf_counter() - begin


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
