"""Where the time goes: per-node latency of a graph module, summed per stage.

Each node is timed as the graph runs (an ``fx.Interpreter``), so every node carries the
interpreter's small per-node overhead; the figures are for *shares* of the run time, not
for absolute latency (``bench`` measures that on the compiled module).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, Literal

import torch
from torch import fx

from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.graph.modes import eval_mode

Statistic = Literal["median", "min"]
STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "min": min,
}


class _TimingInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, device: torch.device) -> None:
        super().__init__(module)
        self.seconds: dict[str, float] = {}
        self.cuda = device if device.type == "cuda" else None

    def run_node(self, n: fx.Node) -> Any:
        start = time.perf_counter()
        result = super().run_node(n)
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)  # kernels run asynchronously
        self.seconds[n.name] = time.perf_counter() - start
        return result


def node_latencies(
    graph_modules: Sequence[fx.GraphModule],
    input_size: tuple[int, int, int],
    *,
    batch: int = 1,
    repeats: int = 7,
    warmup: int = 2,
    statistic: Statistic = "median",
) -> list[dict[str, float]]:
    """Seconds per node of each graph module: the median (or minimum) over ``repeats`` runs
    after ``warmup`` runs, the modules' runs interleaved.

    The first run or two of a model are much slower (kernels are chosen and memory
    allocated on first use), hence ``warmup`` untimed rounds first. Each round runs every
    module once, in an order that rotates from round to round, so that load from elsewhere
    on the machine hits all of them alike. ``statistic="min"`` takes each node's fastest
    run: on a busy machine a node's time is its own plus whatever the scheduler adds at
    random, and the minimum is the steadier estimate of the former (for shares of the
    run time). All get the same
    input (seeded; the caller's random state is untouched), on the device of their
    parameters, in eval mode (flags restored).
    """
    if repeats < 1 or batch < 1 or warmup < 0:
        raise UlsamUsageError(
            f"repeats and batch must be >= 1 and warmup >= 0; got {repeats}, {batch}, {warmup}"
        )
    if statistic not in STATISTICS:
        raise UlsamUsageError(
            f"statistic must be one of {', '.join(STATISTICS)}; got {statistic!r}"
        )
    reduce = STATISTICS[statistic]
    first = next((p for m in graph_modules for p in m.parameters()), None)
    dtype = next(
        (p.dtype for m in graph_modules for p in m.parameters() if p.is_floating_point()),
        torch.float32,
    )
    device = first.device if first is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, *input_size, generator=generator, dtype=dtype).to(device)
    runs: list[list[dict[str, float]]] = [[] for _ in graph_modules]
    count = len(graph_modules)
    with ExitStack() as stack:
        for module in graph_modules:
            stack.enter_context(eval_mode(module))
        stack.enter_context(torch.inference_mode())
        for i in range(warmup + repeats):
            for k in range(count):
                which = (i + k) % count
                interpreter = _TimingInterpreter(graph_modules[which], device)
                interpreter.run(example)
                if i >= warmup:
                    runs[which].append(interpreter.seconds)
    return [
        {name: reduce([run[name] for run in module_runs]) for name in module_runs[0]}
        for module_runs in runs
    ]
