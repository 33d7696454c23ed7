"""A sweep as flat records, a rich table and a CSV file (data and renderables; no printing)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ulsam_inject.io.fileio import atomic_write
from ulsam_inject.surgery.report import human, signed
from ulsam_inject.sweeps.row import SweepRow
from ulsam_inject.sweeps.run import SweepResult

CSV_COLUMNS = (
    "at",
    "stages",
    "groups",
    "mode",
    "status",
    "reason",
    "params",
    "params_delta",
    "macs",
    "macs_delta",
    "macs_percent",
    "other_ops",
    "other_ops_delta",
    "bytes",
    "bytes_delta",
    "latency_ms",
    "latency_p10_ms",
    "latency_p90_ms",
    "latency_ratio",
    "top1",
    "top5",
    "val_loss",
    "best_epoch",
    "seconds",
)
"""One CSV row per configuration, the original first; ``bytes`` = bytes read + written;
``*_delta`` against the original; accuracies are fractions; empty where not measured."""


def record(row: SweepRow) -> dict[str, Any]:
    """``row`` as one flat record with the :data:`CSV_COLUMNS` (None where not measured)."""
    flat: dict[str, Any] = dict.fromkeys(CSV_COLUMNS)
    config = row.config
    flat.update(
        at=config.at,
        stages=" ".join(config.stages),
        groups=config.groups,
        mode=config.mode,
        status=row.status,
        reason=row.reason,
        seconds=row.seconds,
    )
    if row.cost is not None:
        after, change = row.cost["after"], row.cost["change"]
        flat.update(
            params=after["params"],
            params_delta=change["params"]["delta"],
            macs=after["macs"],
            macs_delta=change["macs"]["delta"],
            macs_percent=change["macs"]["percent"],
            other_ops=after["other_ops"],
            other_ops_delta=change["other_ops"]["delta"],
            bytes=after["bytes_read"] + after["bytes_written"],
            bytes_delta=change["bytes_read"]["delta"] + change["bytes_written"]["delta"],
        )
    if row.latency is not None:
        flat.update(
            latency_ms=row.latency["median_ms"],
            latency_p10_ms=row.latency["p10_ms"],
            latency_p90_ms=row.latency["p90_ms"],
            latency_ratio=row.latency["ratio"],
        )
    if row.accuracy is not None:
        flat.update(
            top1=row.accuracy["top1"],
            top5=row.accuracy["top5"],
            val_loss=row.accuracy["loss"],
            best_epoch=row.accuracy["best_epoch"],
        )
    return flat


def records(result: SweepResult) -> list[dict[str, Any]]:
    """The original's record, then each configuration's."""
    return [record(result.reference), *(record(row) for row in result.rows)]


def write_csv(result: SweepResult, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write :func:`records` as CSV (header :data:`CSV_COLUMNS`), atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for item in records(result):
                writer.writerow({k: "" if v is None else v for k, v in item.items()})

    return atomic_write(path, write, force=force)


def render_sweep(result: SweepResult) -> RenderableType:
    """A rich table: the original's totals, then each configuration's deltas; skip reasons."""
    size = "x".join(map(str, result.input_size))
    name = result.settings.get("model") or "model"
    table = Table(title=f"{name} at {size}: ULSAM sweep", title_justify="left")
    timed = any(r.latency is not None for r in (result.reference, *result.rows))
    trained = any(r.accuracy is not None for r in (result.reference, *result.rows))
    headers = ["positions", "g", "mode", "status", "params", "MACs", "MACs %", "other ops"]
    headers.append("bytes")
    if timed:
        headers += ["latency ms", "x original"]
    if trained:
        headers += ["top-1 %", "top-5 %"]
    for header in headers:
        left = header in ("positions", "mode", "status")
        table.add_column(header, justify="left" if left else "right")
    for row in (result.reference, *result.rows):
        table.add_row(*_cells(row, timed, trained))
    caption = "original: totals; other rows: change against it (bytes: activations read + written)"
    if timed:
        caption += "; latency: median; x original: ratio to the original, timed interleaved"
    if trained:
        caption += "; top-1/top-5: the best epoch's, on val"
    table.caption = caption
    parts: list[RenderableType] = [table]
    for row in result.rows:
        if row.status == "skipped":
            parts.append(Text(f"skipped {row.config.label()}: {row.reason}"))
    return Group(*parts)


def _cells(row: SweepRow, timed: bool, trained: bool) -> list[str]:
    config = row.config
    flat = record(row)
    reference = config.is_original
    cells = [
        config.at,
        "" if config.groups is None else str(config.groups),
        config.mode or "",
        "reference" if reference and row.status == "done" else row.status,
    ]
    if row.cost is None:
        cells += [""] * 5
    elif reference:
        cells += [
            human(flat["params"]),
            human(flat["macs"]),
            "",
            human(flat["other_ops"]),
            human(flat["bytes"], "B"),
        ]
    else:
        cells += [
            signed(flat["params_delta"]),
            signed(flat["macs_delta"]),
            f"{flat['macs_percent']:+.3f}",
            signed(flat["other_ops_delta"]),
            signed(flat["bytes_delta"], "B"),
        ]
    if timed:
        if row.latency is None:
            cells += ["", ""]
        else:
            cells += [f"{flat['latency_ms']:.3f}", f"{flat['latency_ratio']:.3f}"]
    if trained:
        if row.accuracy is None:
            cells += ["", ""]
        else:
            cells += [f"{100 * flat['top1']:.2f}", f"{100 * flat['top5']:.2f}"]
    return cells
