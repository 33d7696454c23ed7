"""A picture of a retrofit: per-stage MACs and latency share, before and after.

Bars per stage: the original (grey) and the retrofitted model (blue), with each ULSAM's
own share stacked on its stage (red); inserted positions are marked, replaced stages named.
Needs matplotlib (``pip install 'ulsam-inject[plot]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from ulsam_inject.cost.count import count
from ulsam_inject.errors import MissingDependencyError, OutputError
from ulsam_inject.graph.trace import Traced
from ulsam_inject.io.fileio import atomic_write, check_output_path
from ulsam_inject.measure.profile import node_latencies
from ulsam_inject.surgery.inject import Retrofit
from ulsam_inject.surgery.report import human
from ulsam_inject.surgery.seeing import trace_model

FORMATS = (".png", ".svg")


def stage_breakdown(
    original: nn.Module, retrofit: Retrofit, *, latency: bool = True, repeats: int = 15
) -> dict[str, Any]:
    """Per-stage MACs and latency shares before and after, and each block's share.

    Returns ``{"stages": [names], "macs_before", "macs_after", "macs_block",
    "time_before", "time_after", "time_block"}`` (lists aligned with the stages; a
    replaced stage has 0 after, its ULSAM is in ``*_block``; time values are fractions of
    the whole model's time, empty when ``latency`` is False) and the whole models' totals
    ``"total_macs_before"``, ``"total_macs_after"``, ``"total_params_before"``,
    ``"total_params_after"`` (the stem, head and anything else outside the stages
    included). Latency is per node through ``torch.fx``'s interpreter, batch 1, the two
    models interleaved, each node's fastest of ``repeats`` runs (steady on a busy machine,
    where medians of single nodes are not).
    """
    size = retrofit.input_size
    stages = retrofit.stages
    rewritten_root = any(p.rewrite == "root" for p in retrofit.plan.placements)
    if rewritten_root:  # the rewritten graph keeps the original trace's node names
        assert isinstance(retrofit.model, fx.GraphModule)
        after = retrofit.model
    else:  # the user's model, changed stage by stage: its graph made again, as inject did
        after = trace_model(retrofit.model, size, propagate=False).graph_module
    if retrofit.costs is not None:
        cost_before, cost_after = retrofit.costs
    else:  # injected with report=False
        cost_before = count(original, size)
        cost_after = count(Traced(after, size, dict(retrofit.leaves), root=after))
    placed = {p.stage.name: p for p in retrofit.plan.placements}
    block_node = {
        p.module_name: n.name
        for n in after.graph.nodes
        for p in retrofit.plan.placements
        if n.op == "call_module" and n.target == p.module_name
    }
    nodes_after = {
        stage.name: list(stage.nodes) if rewritten_root else _nodes_within(after, stage.name)
        for stage in stages
    }
    seconds_before: dict[str, float] = {}
    seconds_after: dict[str, float] = {}
    if latency:
        # Per-node timing needs the original as a graph: the one traced graph made again.
        before = trace_model(original, size, propagate=False).graph_module
        seconds_before, seconds_after = node_latencies(
            [before, after], size, repeats=repeats, statistic="min"
        )
    total_before = sum(seconds_before.values()) or 1.0
    total_after = sum(seconds_after.values()) or 1.0
    data: dict[str, Any] = {
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
        data["macs_after"].append(cost_after.for_nodes(nodes_after[stage.name]).macs if kept else 0)
        data["macs_block"].append(cost_after.for_nodes([block]).macs if block else 0)
        if latency:
            data["time_before"].append(
                sum(seconds_before.get(n, 0.0) for n in stage.nodes) / total_before
            )
            data["time_after"].append(
                sum(seconds_after.get(n, 0.0) for n in nodes_after[stage.name]) / total_after
                if kept
                else 0.0
            )
            data["time_block"].append(seconds_after.get(block, 0.0) / total_after if block else 0.0)
    data["total_macs_before"] = cost_before.macs
    data["total_macs_after"] = cost_after.macs
    data["total_params_before"] = cost_before.params
    data["total_params_after"] = cost_after.params
    return data


def _percent_change(old: float, new: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "n/a"


def plot_retrofit(
    original: nn.Module,
    retrofit: Retrofit,
    path: str | Path,
    *,
    latency: bool = True,
    force: bool = False,
    repeats: int = 15,
) -> Path:
    """Write the figure to ``path`` (.png or .svg), atomically; returns the path.

    One panel of MACs per stage (and, with ``latency``, one of each stage's share of the
    model's latency), original and retrofitted side by side, each ULSAM stacked on the
    stage it follows or replaces; placed stages are shaded and labelled with g, the mode
    and the block's own MAC delta (for a replaced stage: ULSAM's MACs minus the stage's,
    as in the report). An existing file is replaced only with ``force``.
    """
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise OutputError(f"figure {target} must end in .png or .svg, got {target.suffix!r}")
    check_output_path(target, force=force)  # before minutes of profiling
    try:
        # The object-oriented API: no pyplot, so the caller's backend and figures are untouched.
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "figures need matplotlib: pip install 'ulsam-inject[plot]'"
        ) from None
    data = stage_breakdown(original, retrofit, latency=latency, repeats=repeats)
    names = data["stages"]
    rows = 2 if latency else 1
    width = max(9.0, 0.62 * len(names) + 2.5)
    figure = Figure(figsize=(width, 3.9 * rows + 0.5))
    axes = figure.subplots(rows, 1, squeeze=False)
    positions = list(range(len(names)))
    left = [x - 0.2 for x in positions]
    right = [x + 0.2 for x in positions]
    panels = [("macs", 1e6, "MACs (millions)")]
    if latency:
        panels.append(("time", 0.01, "share of the model's latency (%)"))
    placed = {p.stage.name: p for p in retrofit.plan.placements}
    red, blue, grey = "#d62728", "#1f77b4", "#9e9e9e"
    for axis, (key, scale, label) in zip(axes[:, 0], panels):
        before = [v / scale for v in data[f"{key}_before"]]
        after = [v / scale for v in data[f"{key}_after"]]
        block = [v / scale for v in data[f"{key}_block"]]
        axis.bar(left, before, width=0.4, color=grey, label="original")
        axis.bar(right, after, width=0.4, color=blue, label="retrofitted: stage")
        axis.bar(right, block, width=0.4, bottom=after, color=red, label="retrofitted: ULSAM")
        axis.set_ylabel(label)
        heights = [max(b, a + k) for b, a, k in zip(before, after, block)]
        top = max([*heights, 1e-9])
        for x, name in enumerate(names):
            placement = placed.get(name)
            if placement is None:
                continue
            axis.axvspan(x - 0.5, x + 0.5, color=red, alpha=0.07, linewidth=0)
            replaced = placement.mode == "replace"
            own = data[f"{key}_block"][x]
            if key == "macs":
                delta = own - data["macs_before"][x] if replaced else own
                change = ("+" if delta > 0 else "") + human(delta, significant=True)
                amount = ("net " if replaced else "") + change
            else:
                amount = f"{100 * own:.1f}%"
            axis.annotate(
                f"ULSAM g={placement.groups}\n{'replaces' if replaced else 'after'}\n{amount}\n▼",
                (x, heights[x] + 0.01 * top),
                ha="center",
                va="bottom",
                fontsize=7,
                color=red,
                linespacing=1.1,
            )
        axis.set_ylim(0, top * 1.45)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set_xticks(positions)
        axis.set_xticklabels(names, rotation=60, ha="right", fontsize=7.5)
        for tick, name in zip(axis.get_xticklabels(), names):
            if name in placed:
                tick.set_color(red)
                tick.set_fontweight("bold")
        axis.legend(fontsize=7.5, loc="upper left", ncol=3, frameon=False)
        axis.grid(axis="y", alpha=0.3)
    size = "x".join(map(str, retrofit.input_size))
    macs_old, macs_new = data["total_macs_before"], data["total_macs_after"]
    params_old, params_new = data["total_params_before"], data["total_params_after"]
    macs = f"{human(macs_old, significant=True)} → {human(macs_new, significant=True)}"
    params = f"{human(params_old, significant=True)} → {human(params_new, significant=True)}"
    axes[0, 0].set_title(
        f"{retrofit.source or type(original).__name__} at {size}: per-stage cost before and "
        f"after ULSAM\nwhole model: MACs {macs} ({_percent_change(macs_old, macs_new)}), "
        f"params {params} ({_percent_change(params_old, params_new)}); "
        f"stem and head not drawn",
        fontsize=10,
    )
    if latency:
        axes[-1, 0].set_title(
            f"share of latency per stage: each node's fastest of {repeats} runs through the "
            f"fx interpreter, batch 1, models interleaved; shares of the whole model",
            fontsize=8,
        )
    figure.tight_layout()

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format=target.suffix.lower().lstrip("."), dpi=130)

    return atomic_write(target, write, force=force)


def _nodes_within(graph_module: fx.GraphModule, path: str) -> list[str]:
    """Nodes made by the code of the module at ``path`` (a stage), but its ULSAM block's."""
    block = f"{path}.ulsam"
    found = []
    for node in graph_module.graph.nodes:
        scopes = [*node.meta.get("scope", ()), str(node.target) if node.op == "call_module" else ""]
        if any(s == block or s.startswith(block + ".") for s in scopes):
            continue
        if any(s == path or s.startswith(path + ".") for s in scopes):
            found.append(node.name)
    return found
