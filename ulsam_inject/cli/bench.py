"""``ulsam-inject bench``: latency of the model before and after the retrofit, side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ulsam_inject.block.module import DEFAULT_INIT, check_init
from ulsam_inject.measure.bench import LatencyReport, measure_latency
from ulsam_inject.surgery.inject import inject as inject_model
from ulsam_inject.surgery.plan import DEFAULT_GROUPS, DEFAULT_MODE

from .common import (
    MODEL_HELP,
    CheckpointOption,
    InitOption,
    InputSizeOption,
    JsonOption,
    KwargsOption,
    PretrainedOption,
    TrustOption,
    TrustRecipeOption,
    console,
    err_console,
    load_model,
    print_json,
    refuse_retrofitted,
)
from .options import per_position


def bench(
    model: str = typer.Argument(..., help=MODEL_HELP),
    at: str = typer.Option(..., "--at", "-a", help="Positions, as for 'inject'."),
    groups: list[str] | None = typer.Option(None, "--groups", "-g", help="g or POSITION=g."),
    mode: list[str] | None = typer.Option(
        None, "--mode", "-m", help="after/replace or POSITION=MODE."
    ),
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Batch size."),
    threads: int | None = typer.Option(
        None, "--threads", "-t", min=1, help="CPU threads (default: torch's)."
    ),
    device: str = typer.Option(
        "auto", "--device", "-d", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N."
    ),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed runs of each model first."),
    repeats: int = typer.Option(30, "--repeats", "-r", min=1, help="Timed runs of each model."),
    init: str | None = InitOption,
    json_output: bool = JsonOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Time the original and the retrofitted model, interleaved, after a warm-up."""
    # Malformed options fail before the model is built.
    groups_value = per_position(groups, DEFAULT_GROUPS, what="groups", as_int=True)
    mode_value = per_position(mode, DEFAULT_MODE, what="mode", as_int=False)
    init_value = check_init(DEFAULT_INIT if init is None else init)
    refuse_retrofitted(model, "bench")
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
        trust_recipe=trust_recipe,
    )
    original = loaded.module
    result = inject_model(
        original,
        at=at,
        groups=groups_value,
        mode=mode_value,
        input_size=loaded.input_size,
        report=False,
        init=init_value,
    )
    columns = (
        TextColumn("timing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(
        *columns, console=err_console, transient=True, disable=not err_console.is_terminal
    ) as bar:
        task = bar.add_task("timing", total=repeats)
        report = measure_latency(
            original,
            result.model,
            loaded.input_size,
            batch=batch,
            device=device,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    if json_output:
        data = report.to_dict()
        print_json(
            {
                "schema": data.pop("schema"),
                "model": loaded.source,
                "plan": result.plan.to_list(),
                **data,
            }
        )
        return
    console.print(render_latency(report, loaded.source or model))


def render_latency(report: LatencyReport, name: str) -> Table:
    size = "x".join(map(str, report.input_size))
    table = Table(
        title=f"{name}: batch {report.batch} x {size}, {report.device}, {report.threads} threads",
        title_justify="left",
    )
    for header in ("model", "median ms", "p10 ms", "p90 ms", "runs"):
        table.add_column(header, justify="left" if header == "model" else "right")
    for label, timing in (("original", report.before), ("with ULSAM", report.after)):
        table.add_row(
            label,
            f"{timing.median_ms:.3f}",
            f"{timing.p10_ms:.3f}",
            f"{timing.p90_ms:.3f}",
            str(timing.samples),
        )
    change = (report.ratio - 1) * 100
    table.caption = f"latency ratio (median after / before): {report.ratio:.3f}x ({change:+.1f}%)"
    return table
