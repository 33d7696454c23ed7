"""The injection report: what each inserted or replaced block costs, and totals before -> after.

JSON schema ``ulsam-inject.report/1`` (integers unless noted)::

    {
      "schema": "ulsam-inject.report/1",
      "model": str | null,            # model spec, when known
      "input_size": [C, H, W],
      "units": {...},                 # what each number counts
      "before": {"params", "trainable_params", "macs", "flops", "other_ops",
                 "bytes_read", "bytes_written"},
      "after":  {... same keys ...},
      "change": {key: {"delta": int, "percent": float}},
      "blocks": [{"stage", "index", "mode", "module", "rewrite", "channels", "groups",
                  "height", "width", "params", "macs", "flops", "other_ops", "bytes"}],
      "uncounted": [op names no rule counts]
    }

``module`` is where the block lives in the retrofitted model; ``rewrite`` is ``"stage"``
when only the stage's own module was changed (the model keeps its class), ``"root"`` when
the whole model's graph was. A block's numbers are its own deltas: for ``after``, ULSAM's
cost; for ``replace``, ULSAM's cost minus the removed stage's. ``ulsam-inject inject
--json`` adds ``"dry_run"`` (bool) and ``"written"`` (the paths it wrote).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ulsam_inject.cost.count import TOTAL_KEYS, Cost
from ulsam_inject.surgery.plan import Placement

SCHEMA = "ulsam-inject.report/1"
UNITS = {
    "params": "parameter elements",
    "macs": "multiply-adds of conv, linear and matmul ops (the paper's and torchvision's FLOPs)",
    "flops": "2 x macs",
    "other_ops": "elementwise, activation, pooling, softmax and normalization ops, one per "
    "element per op (see ulsam_inject.cost.rules)",
    "bytes": "activation bytes read + written by each op (views move none)",
}


@dataclass(frozen=True)
class BlockCost:
    """One placement's own deltas."""

    stage: str
    index: int
    mode: str
    module: str
    channels: int
    groups: int
    height: int
    width: int
    params: int
    macs: int
    other_ops: int
    bytes: int
    rewrite: str = "root"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "index": self.index,
            "mode": self.mode,
            "module": self.module,
            "rewrite": self.rewrite,
            "channels": self.channels,
            "groups": self.groups,
            "height": self.height,
            "width": self.width,
            "params": self.params,
            "macs": self.macs,
            "flops": 2 * self.macs,
            "other_ops": self.other_ops,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class Report:
    """Totals before and after, and each block's deltas."""

    model: str | None
    input_size: tuple[int, int, int]
    before: dict[str, int]
    after: dict[str, int]
    blocks: tuple[BlockCost, ...]
    uncounted: tuple[str, ...]

    def change(self, key: str) -> tuple[int, float]:
        """Absolute and percentage change of a total."""
        old, new = self.before[key], self.after[key]
        return new - old, (100.0 * (new - old) / old) if old else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The versioned JSON document (see the module docstring)."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "input_size": list(self.input_size),
            "units": UNITS,
            "before": dict(self.before),
            "after": dict(self.after),
            "change": {
                key: {"delta": self.change(key)[0], "percent": round(self.change(key)[1], 4)}
                for key in TOTAL_KEYS
            },
            "blocks": [block.to_dict() for block in self.blocks],
            "uncounted": list(self.uncounted),
        }


def build_report(
    placements: Iterable[Placement],
    before: Cost,
    after: Cost,
    *,
    removed_params: dict[str, int],
    block_params: dict[str, int],
    model: str | None,
    input_size: tuple[int, int, int],
) -> Report:
    """Assemble a report from the costs counted before and after the rewrite.

    ``removed_params`` maps a replaced stage's name to its parameter count;
    ``block_params`` maps a new block's module name to its parameter count.
    """
    blocks = []
    for placement in placements:
        added = after.for_module(placement.module_name)
        macs, other, traffic = added.macs, added.other_ops, added.bytes
        params = block_params[placement.module_name]
        if placement.mode == "replace":
            removed = before.for_nodes(placement.stage.nodes)
            macs -= removed.macs
            other -= removed.other_ops
            traffic -= removed.bytes
            params -= removed_params[placement.stage.name]
        stage = placement.stage
        blocks.append(
            BlockCost(
                stage=stage.name,
                index=stage.index,
                mode=placement.mode,
                module=placement.module_name,
                channels=placement.channels,
                groups=placement.groups,
                height=stage.height,
                width=stage.width,
                params=params,
                macs=macs,
                other_ops=other,
                bytes=traffic,
                rewrite=placement.rewrite,
            )
        )
    uncounted = tuple(sorted(set(before.uncounted) | set(after.uncounted)))
    return Report(model, input_size, before.summary(), after.summary(), tuple(blocks), uncounted)


# -- rendering ---------------------------------------------------------------------------


def human(value: float, unit: str = "", *, significant: bool = False) -> str:
    """A number with an SI prefix: three decimals, or three significant digits.

    Tables show three decimals (``1234567 -> '1.235M'``); figure labels, short of room,
    three significant digits (``significant=True``: ``37632 -> '37.6K'``, ``999600 ->
    '1.00M'``).

    Example:
        >>> human(1234567, "B"), human(-22654464, significant=True), human(999)
        ('1.235MB', '-22.7M', '999')
    """
    sign = "-" if value < 0 else ""
    value = abs(value)
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        # Rounding to three significant digits carries 999.6K up to 1.00M.
        if value >= (factor * 0.9995 if significant else factor):
            scaled = value / factor
            digits = 3 if not significant else 0 if scaled >= 99.95 else 1 if scaled >= 9.995 else 2
            return f"{sign}{scaled:.{digits}f}{prefix}{unit}"
    return f"{sign}{value:.0f}{unit}"


def signed(value: float, unit: str = "") -> str:
    return ("+" if value > 0 else "") + human(value, unit)


def render_report(report: Report, *, dry_run: bool = False) -> RenderableType:
    """Rich tables: one row per block, then totals before -> after."""
    title = "ULSAM blocks (dry run: nothing written)" if dry_run else "ULSAM blocks"
    blocks = Table(title=title, title_justify="left")
    for header in ("#", "stage", "mode", "C x H x W", "g", "params", "MACs", "other ops", "bytes"):
        blocks.add_column(header, justify="left" if header in ("stage", "mode") else "right")
    for block in report.blocks:
        blocks.add_row(
            str(block.index),
            block.stage,
            block.mode,
            f"{block.channels}x{block.height}x{block.width}",
            str(block.groups),
            signed(block.params),
            signed(block.macs),
            signed(block.other_ops),
            signed(block.bytes, "B"),
        )
    summary = Table(title="Totals", title_justify="left")
    for header in ("", "before", "after", "change", "%"):
        summary.add_column(header, justify="left" if not header else "right")
    rows = (
        ("params", "params", ""),
        ("MACs", "macs", ""),
        ("FLOPs (2 x MACs)", "flops", ""),
        ("other ops", "other_ops", ""),
        ("bytes read", "bytes_read", "B"),
        ("bytes written", "bytes_written", "B"),
    )
    for label, key, unit in rows:
        delta, percent = report.change(key)
        summary.add_row(
            label,
            human(report.before[key], unit),
            human(report.after[key], unit),
            signed(delta, unit),
            f"{percent:+.3f}%",
        )
    parts: list[RenderableType] = [blocks, summary]
    if report.uncounted:
        parts.append(Text(f"ops with no cost rule (not counted): {', '.join(report.uncounted)}"))
    return Group(*parts)
