"""``ulsam-inject count``: parameters, MACs, FLOPs, other ops and bytes of a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ulsam_inject.cost.count import count as count_cost
from ulsam_inject.surgery.report import human
from ulsam_inject.surgery.seeing import find_stages, trace_model

from .common import (
    MODEL_HELP,
    CheckpointOption,
    InputSizeOption,
    JsonOption,
    KwargsOption,
    PretrainedOption,
    TrustOption,
    TrustRecipeOption,
    console,
    load_model,
    note,
    print_json,
    progress,
)

SCHEMA = "ulsam-inject.count/1"


def count(
    model: str = typer.Argument(..., help=MODEL_HELP),
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    json_output: bool = JsonOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Count parameters, MACs (multiply-adds), FLOPs (2 x MACs), other ops and bytes."""
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
        trust_recipe=trust_recipe,
    )
    progress(f"counting at {'x'.join(map(str, loaded.input_size))}")
    traced = trace_model(loaded.module, loaded.input_size)
    cost = count_cost(traced)
    found = find_stages(traced)
    per_stage = cost.for_stages(found)
    if json_output:
        print_json(
            {
                "schema": SCHEMA,
                "model": loaded.source,
                "input_size": list(loaded.input_size),
                "params": cost.params,
                "trainable_params": cost.trainable_params,
                "buffers": cost.buffers,
                "macs": cost.macs,
                "flops": cost.flops,
                "other_ops": cost.other_ops,
                "bytes_read": cost.bytes_read,
                "bytes_written": cost.bytes_written,
                "uncounted": list(cost.uncounted),
                "leaves": dict(traced.leaves),
                "stages": [
                    {
                        "index": stage.index,
                        "name": stage.name,
                        "params": per_stage[stage.name].params,
                        "macs": per_stage[stage.name].macs,
                        "other_ops": per_stage[stage.name].other_ops,
                        "bytes": per_stage[stage.name].bytes,
                    }
                    for stage in found
                ],
            }
        )
        return
    table = Table(
        title=f"{loaded.source or model} at {'x'.join(map(str, loaded.input_size))}",
        title_justify="left",
    )
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("exact", justify="right")
    for label, value, unit in (
        ("params", cost.params, ""),
        ("trainable params", cost.trainable_params, ""),
        ("MACs (multiply-adds)", cost.macs, ""),
        ("FLOPs (2 x MACs)", cost.flops, ""),
        ("other ops", cost.other_ops, ""),
        ("bytes read", cost.bytes_read, "B"),
        ("bytes written", cost.bytes_written, "B"),
    ):
        table.add_row(label, human(value, unit), f"{value:,}")
    console.print(table)
    if cost.uncounted:
        note(f"ops with no cost rule (not counted): {', '.join(cost.uncounted)}")
