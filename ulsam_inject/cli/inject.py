"""``ulsam-inject inject``: retrofit ULSAM, report the costs, write the model."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UlsamUsageError
from ..fileio import check_output_path
from ..inject import Retrofit
from ..inject import inject as inject_model
from ..report import render_report
from .common import (
    MODEL_HELP,
    CheckpointOption,
    InputSizeOption,
    JsonOption,
    KwargsOption,
    PretrainedOption,
    TrustOption,
    console,
    load_model,
    print_json,
    progress,
)
from .options import per_position


def inject(
    model: str = typer.Argument(..., help=MODEL_HELP),
    at: str = typer.Option(
        ...,
        "--at",
        "-a",
        help="Positions: 13, -1, 12-15, features.13, 'features.1*', all; comma-separated.",
    ),
    groups: list[str] | None = typer.Option(
        None, "--groups", "-g", help="g (default 4), or POSITION=g; repeatable."
    ),
    mode: list[str] | None = typer.Option(
        None, "--mode", "-m", help="after (default) or replace, or POSITION=MODE; repeatable."
    ),
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write weights + recipe: .safetensors (default) or .pt."
    ),
    export: Path | None = typer.Option(
        None, "--export", help="Also write a torch.export program (.pt2) for deployment."
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a figure (.png or .svg) of per-stage MACs and latency share."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; write nothing."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    json_output: bool = JsonOption,
    trust_checkpoint: bool = TrustOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Insert ULSAM after stages (or in place of identity-shaped ones) and report costs."""
    outputs = [p for p in (out, export, plot) if p is not None]
    if dry_run and outputs:
        raise UlsamUsageError(
            "--dry-run writes nothing: drop --out, --export and --plot, or --dry-run"
        )
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise UlsamUsageError("--out, --export and --plot must name different files")
    if not dry_run:
        # Refuse bad outputs before any heavy work, and never write onto the input.
        for path in outputs:
            check_output_path(path, force=force)
            if checkpoint is not None and path.resolve() == checkpoint.resolve():
                raise UlsamUsageError(f"output {path} is the input checkpoint; choose another path")
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
    )
    if loaded.retrofit is not None:
        raise UlsamUsageError(
            f"{model} is already retrofitted; inject into its source model "
            f"({loaded.source}) with the combined positions instead"
        )
    progress(f"tracing and rewriting at {'x'.join(map(str, loaded.input_size))}")
    result = inject_model(
        loaded.module,
        at=at,
        groups=per_position(groups, 4, what="groups", as_int=True),
        mode=per_position(mode, "after", what="mode", as_int=False),
        input_size=loaded.input_size,
    )
    result = result.with_source(loaded.source, loaded.source_kwargs)
    report = result.report
    if json_output:
        document = report.to_dict() if report is not None else {}
        document["dry_run"] = dry_run
        document["written"] = []
    if not dry_run:
        written = _write(result, out, export, force=force, protect=checkpoint)
        if plot is not None:
            from ..figure import plot_retrofit

            progress("profiling stages for the figure")
            written.append(plot_retrofit(loaded.module, result, plot, force=force))
            progress(f"wrote {plot}")
        if json_output:
            document["written"] = [str(p) for p in written]
    if json_output:
        print_json(document)
    elif report is not None:
        console.print(render_report(report, dry_run=dry_run))
    if dry_run:
        progress("dry run: nothing written")


def _write(
    result: Retrofit, out: Path | None, export: Path | None, *, force: bool, protect: Path | None
) -> list[Path]:
    from ..artifact import export_program, save

    written = []
    if out is not None:
        written.append(save(result, out, force=force, protect=protect))
        progress(f"wrote {out}")
    if export is not None:
        written.append(export_program(result, export, force=force, protect=protect))
        progress(f"wrote {export}")
    return written
