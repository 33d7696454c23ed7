"""A figure of a sweep: one line per position set (and mode) against g, the original as a
horizontal reference line. Accuracy when the sweep was trained, else latency when timed
(as the ratio to the original timed interleaved with each configuration: absolute times
drift with the machine's load from one configuration to the next, the ratio much less),
else MACs. Needs matplotlib (``pip install 'ulsam-inject[plot]'``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ulsam_inject.errors import MissingDependencyError, OutputError
from ulsam_inject.io.fileio import atomic_write, check_output_path
from ulsam_inject.surgery.report import human
from ulsam_inject.sweeps.row import SweepRow
from ulsam_inject.sweeps.run import SweepResult

FORMATS = (".png", ".svg")


def plotted_metric(result: SweepResult) -> str:
    """``"top1"``, ``"latency"`` or ``"macs"``: what :func:`plot_sweep` draws."""
    rows = (result.reference, *result.rows)
    if any(row.accuracy is not None for row in rows):
        return "top1"
    if any(row.latency is not None for row in rows):
        return "latency"
    return "macs"


def _value(row: SweepRow, metric: str) -> float | None:
    if metric == "top1":
        return None if row.accuracy is None else 100.0 * float(row.accuracy["top1"])
    if metric == "latency":
        return None if row.latency is None else float(row.latency["ratio"])
    total = row.total("macs")
    return None if total is None else float(total)


def series(result: SweepResult, metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{"features.13 (after)": [(g, value), ...]}`` over the rows that have a value."""
    lines: dict[str, list[tuple[int, float]]] = {}
    modes = {row.config.mode for row in result.rows}
    for row in result.rows:
        value = _value(row, metric)
        if value is None or row.config.groups is None:
            continue
        name = row.config.at + (f" ({row.config.mode})" if len(modes) > 1 else "")
        lines.setdefault(name, []).append((row.config.groups, value))
    return lines


def plot_sweep(result: SweepResult, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Draw the sweep into ``path`` (.png or .svg), atomically; returns the path written."""
    target = check_output_path(path, force=force)
    if target.suffix.lower() not in FORMATS:
        raise OutputError(
            f"{target}: a figure is {' or '.join(FORMATS)}, got {target.suffix or 'no suffix'!r}"
        )
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "figures need matplotlib: pip install 'ulsam-inject[plot]'"
        ) from None
    metric = plotted_metric(result)
    labels = {
        "top1": "validation top-1 (%), best epoch",
        "latency": "latency / original's (medians, timed interleaved)",
        "macs": "MACs",
    }
    figure = Figure(figsize=(7.0, 4.2))
    axis: Any = figure.add_subplot(1, 1, 1)
    groups: set[int] = set()
    for name, points in series(result, metric).items():
        points.sort()
        groups.update(g for g, _ in points)
        axis.plot([g for g, _ in points], [v for _, v in points], marker="o", label=name)
    # The original timed against itself has a ratio of 1 but for noise: the line is at 1.
    reference = 1.0 if metric == "latency" else _value(result.reference, metric)
    if reference is not None:
        axis.axhline(reference, color="0.35", linestyle="--", linewidth=1.2, label="original")
    if groups:
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(groups))
        axis.set_xticklabels([str(g) for g in sorted(groups)])
    if metric == "macs":
        axis.yaxis.set_major_formatter(lambda value, _: human(value, significant=True))
    axis.set_xlabel("g (subspaces)")
    axis.set_ylabel(labels[metric])
    size = "x".join(map(str, result.input_size))
    axis.set_title(f"{result.settings.get('model')} at {size}: ULSAM sweep", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, frameon=False)
    figure.tight_layout()

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format=target.suffix.lower().lstrip("."), dpi=130)

    return atomic_write(target, write, force=force)
