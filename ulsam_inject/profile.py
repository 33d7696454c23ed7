"""Where the time goes: per-node latency of a graph module, summed per stage.

Each node is timed as the graph runs (an ``fx.Interpreter``), so every node carries the
interpreter's small per-node overhead; the figures are for *shares* of the run time, not
for absolute latency (``bench`` measures that on the compiled module).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from .trace import eval_mode


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.seconds: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        start = time.perf_counter()
        result = super().run_node(n)
        self.seconds[n.name] = time.perf_counter() - start
        return result


def node_latency(
    graph_module: fx.GraphModule,
    input_size: tuple[int, int, int],
    *,
    batch: int = 1,
    repeats: int = 7,
) -> dict[str, float]:
    """Median seconds per node over ``repeats`` runs (eval mode, no grad, after one warm-up)."""
    dtype = next(
        (p.dtype for p in graph_module.parameters() if p.is_floating_point()), torch.float32
    )
    example = torch.randn(batch, *input_size, dtype=dtype)
    runs: list[dict[str, float]] = []
    with eval_mode(graph_module), torch.inference_mode():
        for i in range(repeats + 1):
            interpreter = _TimingInterpreter(graph_module)
            interpreter.run(example)
            if i:
                runs.append(interpreter.seconds)
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def share(
    seconds: dict[str, float], groups: Iterable[tuple[str, Iterable[str]]]
) -> dict[str, float]:
    """Fraction of the total time spent in each named group of nodes."""
    total = sum(seconds.values()) or 1.0
    return {label: sum(seconds.get(n, 0.0) for n in names) / total for label, names in groups}
