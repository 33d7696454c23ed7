"""A picture of a retrofit: per-stage MACs and latency share, before and after.

Bars per stage: the original (grey) and the retrofitted model (blue), with each ULSAM's
own share stacked on its stage (red); inserted positions are marked, replaced stages named.
Needs matplotlib (``pip install 'ulsam-inject[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .cost import count
from .errors import MissingDependencyError, OutputError
from .fileio import atomic_write
from .inject import Retrofit
from .profile import node_latency
from .report import human
from .stages import find_stages
from .trace import Traced, propagate_shapes, trace_model

FORMATS = (".png", ".svg")


def stage_breakdown(
    original: nn.Module, retrofit: Retrofit, *, latency: bool = True
) -> dict[str, Any]:
    """Per-stage MACs and latency shares before and after, and each block's share.

    Returns ``{"stages": [names], "macs_before", "macs_after", "macs_block",
    "time_before", "time_after", "time_block"}`` (lists aligned with the stages; time
    values are fractions of the whole model's time; empty when ``latency`` is False).
    """
    size = retrofit.input_size
    before = trace_model(original, size)
    # The rewritten graph keeps the original trace's node names: use it as it is.
    after = Traced(retrofit.model, size, dict(retrofit.leaves), root=retrofit.model)
    propagate_shapes(after.graph_module, size)
    stages = find_stages(before)
    cost_before, cost_after = count(before), count(after)
    placed = {p.stage.name: p for p in retrofit.plan.placements}
    block_node = {
        p.module_name: n.name
        for n in after.graph_module.graph.nodes
        for p in retrofit.plan.placements
        if n.op == "call_module" and n.target == p.module_name
    }
    seconds_before = node_latency(before.graph_module, size, repeats=15) if latency else {}
    seconds_after = node_latency(after.graph_module, size, repeats=15) if latency else {}
    total_before = sum(seconds_before.values()) or 1.0
    total_after = sum(seconds_after.values()) or 1.0
    data: dict[str, list[Any]] = {
        key: []
        for key in (
            "stages",
            "macs_before",
            "macs_after",
            "macs_block",
            "time_before",
            "time_after",
            "time_block",
        )
    }
    for stage in stages:
        placement = placed.get(stage.name)
        kept = placement is None or placement.mode == "after"
        block = block_node.get(placement.module_name) if placement else None
        data["stages"].append(stage.name)
        data["macs_before"].append(cost_before.for_nodes(stage.nodes).macs)
        data["macs_after"].append(cost_after.for_nodes(stage.nodes).macs if kept else 0)
        data["macs_block"].append(cost_after.for_nodes([block]).macs if block else 0)
        if latency:
            data["time_before"].append(
                sum(seconds_before.get(n, 0.0) for n in stage.nodes) / total_before
            )
            data["time_after"].append(
                sum(seconds_after.get(n, 0.0) for n in stage.nodes) / total_after if kept else 0.0
            )
            data["time_block"].append(seconds_after.get(block, 0.0) / total_after if block else 0.0)
    return data


def plot_retrofit(
    original: nn.Module,
    retrofit: Retrofit,
    path: str | Path,
    *,
    latency: bool = True,
    force: bool = False,
) -> Path:
    """Write the figure to ``path`` (.png or .svg), atomically; returns the path."""
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise OutputError(f"figure {target} must end in .png or .svg, got {target.suffix!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "figures need matplotlib: pip install 'ulsam-inject[plot]'"
        ) from None
    data = stage_breakdown(original, retrofit, latency=latency)
    rows = 2 if latency else 1
    width = max(8.0, 0.45 * len(data["stages"]) + 2)
    figure, axes = plt.subplots(rows, 1, figsize=(width, 3.6 * rows), squeeze=False)
    positions = list(range(len(data["stages"])))
    left = [x - 0.2 for x in positions]
    right = [x + 0.2 for x in positions]
    panels = [("macs", 1e6, "MACs (millions)")]
    if latency:
        panels.append(("time", 0.01, "share of latency (%)"))
    placed = {p.stage.name: p for p in retrofit.plan.placements}
    for axis, (key, scale, label) in zip(axes[:, 0], panels):
        before = [v / scale for v in data[f"{key}_before"]]
        after = [v / scale for v in data[f"{key}_after"]]
        block = [v / scale for v in data[f"{key}_block"]]
        axis.bar(left, before, width=0.4, color="#9e9e9e", label="original")
        axis.bar(right, after, width=0.4, color="#1f77b4", label="retrofitted: stage")
        axis.bar(right, block, width=0.4, bottom=after, color="#d62728", label="retrofitted: ULSAM")
        axis.set_ylabel(label)
        top = max([b + a for a, b in zip(after, block)] + before + [1e-9])
        for x, name, extra in zip(positions, data["stages"], data[f"{key}_block"]):
            placement = placed.get(name)
            if placement is None:
                continue
            what = "replaced" if placement.mode == "replace" else "after"
            amount = f"+{human(extra)}" if key == "macs" else f"{100 * extra:.1f}%"
            axis.annotate(
                f"▼ g={placement.groups}\n{what}\n{amount}",
                (x, top * 1.02),
                ha="center",
                va="bottom",
                fontsize=6.5,
                color="#d62728",
            )
        axis.set_ylim(0, top * 1.32)
        axis.set_xticks(positions)
        axis.set_xticklabels(data["stages"], rotation=60, ha="right", fontsize=7)
        axis.legend(fontsize=7, loc="upper left")
        axis.grid(axis="y", alpha=0.3)
    size = "x".join(map(str, retrofit.input_size))
    axes[0, 0].set_title(
        f"{retrofit.source or type(original).__name__} at {size}: per-stage cost before and after"
    )
    figure.tight_layout()

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format=target.suffix.lower().lstrip("."), dpi=130)

    try:
        return atomic_write(target, write, force=force)
    finally:
        plt.close(figure)
