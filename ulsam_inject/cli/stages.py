"""``ulsam-inject stages``: list the depthwise/pointwise stages of a model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ulsam_inject.surgery.positions import NO_STAGES
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

SCHEMA = "ulsam-inject.stages/1"


def stages(
    model: str = typer.Argument(..., help=MODEL_HELP),
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    json_output: bool = JsonOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """List the stages (blocks) where ULSAM can go, with their shapes."""
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
        trust_recipe=trust_recipe,
    )
    progress(f"tracing at {'x'.join(map(str, loaded.input_size))}")
    traced = trace_model(loaded.module, loaded.input_size)
    found = find_stages(traced)
    if json_output:
        print_json(
            {
                "schema": SCHEMA,
                "model": loaded.source,
                "input_size": list(loaded.input_size),
                "stages": [stage.to_dict() for stage in found],
                "leaves": dict(traced.leaves),
            }
        )
        return
    table = Table(title=f"{len(found)} stages of {loaded.source or model}", title_justify="left")
    for header in ("#", "name", "kind", "in", "out", "stride", "H x W", "residual", "replaceable"):
        table.add_column(header, justify="left" if header in ("name", "kind") else "right")
    for stage in found:
        table.add_row(
            str(stage.index),
            stage.name,
            stage.kind,
            str(stage.in_channels),
            str(stage.out_channels),
            str(stage.stride),
            f"{stage.height}x{stage.width}",
            "yes" if stage.residual else "",
            "yes" if stage.replaceable else "",
        )
    console.print(table)
    for leaf, reason in traced.leaves.items():
        note(f"untraceable, kept whole: {leaf} ({reason})")
    if not found:
        note(NO_STAGES)
