"""``ulsam-inject inject``: retrofit ULSAM, report the costs, write the model."""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer
from torch import nn

from ulsam_inject.block.module import DEFAULT_INIT, check_init
from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.io.artifact import check_suffix
from ulsam_inject.io.fileio import check_output_path
from ulsam_inject.surgery.inject import Retrofit
from ulsam_inject.surgery.inject import inject as inject_model
from ulsam_inject.surgery.plan import DEFAULT_GROUPS, DEFAULT_MODE
from ulsam_inject.surgery.report import render_report

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
    load_model,
    note,
    print_json,
    progress,
    refuse_retrofitted,
)
from .options import per_position

EXPORT_SUFFIXES = (".pt2", ".onnx")


def inject(
    model: str = typer.Argument(..., help=MODEL_HELP),
    at: str = typer.Option(
        ...,
        "--at",
        "-a",
        help="Positions: 13, -1, 12-15, features.13, 'features.1*', all; comma-separated.",
    ),
    groups: list[str] | None = typer.Option(
        None, "--groups", "-g", help=f"g (default {DEFAULT_GROUPS}), or POSITION=g; repeatable."
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
        None,
        "--export",
        help="Also write a deployable model, dynamic batch: .pt2 (torch.export) or .onnx.",
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a figure (.png or .svg) of per-stage MACs and latency share."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check and report only; say what would be written, write nothing."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for the new blocks' initial weights (same seed, same blocks)."
    ),
    init: str | None = InitOption,
    json_output: bool = JsonOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Insert ULSAM after stages (or in place of identity-shaped ones) and report costs."""
    outputs = [p for p in (out, export, plot) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise UlsamUsageError("--out, --export and --plot must name different files")
    # Malformed options and outputs that cannot be written fail before any heavy work.
    groups_value = per_position(groups, DEFAULT_GROUPS, what="groups", as_int=True)
    mode_value = per_position(mode, DEFAULT_MODE, what="mode", as_int=False)
    init_value = check_init(DEFAULT_INIT if init is None else init)
    if plot is not None:
        _check_plot(plot)
    if export is not None:
        _check_export(export)
    targets = []
    for path in outputs:
        if checkpoint is not None and path.resolve() == checkpoint.resolve():
            raise UlsamUsageError(f"output {path} is the input checkpoint; choose another path")
        targets.append(check_output_path(path, force=force, protect=checkpoint))
    if out is not None:
        check_suffix(out)
    refuse_retrofitted(model, "inject into")
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
        trust_recipe=trust_recipe,
    )
    progress(f"tracing and rewriting at {'x'.join(map(str, loaded.input_size))}")
    result = inject_model(
        loaded.module,
        at=at,
        groups=groups_value,
        mode=mode_value,
        input_size=loaded.input_size,
        seed=seed,
        init=init_value,
    )
    result = result.with_source(loaded.source, loaded.source_kwargs)
    report = result.report
    document = report.to_dict() if report is not None else {}
    document["dry_run"] = dry_run
    document["written"] = []
    document["would_write"] = [str(p) for p in targets] if dry_run else []
    if not dry_run:
        written = _write(loaded.module, result, out, export, plot, force=force, protect=checkpoint)
        document["written"] = [str(p) for p in written]
    if json_output:
        print_json(document)
    elif report is not None:
        console.print(render_report(report, dry_run=dry_run))
    rooted = [p.stage.name for p in result.plan.placements if p.rewrite == "root"]
    if rooted:
        note(
            f"{type(loaded.module).__name__} became a torch.fx GraphModule of the whole model: "
            f"{', '.join(rooted[:3])}{' ...' if len(rooted) > 3 else ''} is no module of its own"
        )
    if dry_run:
        for path in targets:
            note(f"would write {path}")
        note("dry run: nothing written")


def _check_plot(plot: Path) -> None:
    """The figure's format and matplotlib, checked before anything is computed or written."""
    import importlib.util

    from ulsam_inject.errors import MissingDependencyError, OutputError
    from ulsam_inject.measure.figure import FORMATS

    if plot.suffix.lower() not in FORMATS:
        raise OutputError(
            f"--plot {plot}: a figure is {' or '.join(FORMATS)}, got {plot.suffix or 'no suffix'!r}"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'ulsam-inject[plot]'")


def _check_export(export: Path) -> None:
    """The export format (by suffix) and, for ONNX, its exporter, checked up front."""
    from ulsam_inject.errors import OutputError
    from ulsam_inject.io.onnx_export import require_onnx

    suffix = export.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise OutputError(
            f"--export {export}: a deployable model is written as "
            f"{' or '.join(EXPORT_SUFFIXES)}, got {export.suffix or 'no suffix'!r}"
        )
    if suffix == ".onnx":
        require_onnx()


def _write(
    original: nn.Module,
    result: Retrofit,
    out: Path | None,
    export: Path | None,
    plot: Path | None,
    *,
    force: bool,
    protect: Path | None,
) -> list[Path]:
    """Write the outputs asked for; on a failure remove the ones this run created.

    The export (torch.export program or ONNX) is captured first, since capturing is what
    fails most often.
    """
    from ulsam_inject.io.artifact import capture_program, save, write_program
    from ulsam_inject.io.onnx_export import capture_onnx, write_onnx

    written: list[Path] = []
    created: list[Path] = []

    def record(path: Path, existed: bool) -> None:
        written.append(path)
        if not existed:
            created.append(path)

    try:
        onnx = export is not None and export.suffix.lower() == ".onnx"
        program = capture_program(result) if export is not None and not onnx else None
        onnx_program = capture_onnx(result) if onnx else None
        if out is not None:
            existed = out.exists()
            record(save(result, out, force=force, protect=protect), existed)
        if export is not None and program is not None:
            existed = export.exists()
            record(write_program(program, export, force=force, protect=protect), existed)
        if export is not None and onnx_program is not None:
            existed = export.exists()
            record(write_onnx(onnx_program, export, force=force, protect=protect), existed)
        if plot is not None:
            from ulsam_inject.measure.figure import plot_retrofit

            progress("profiling stages for the figure")
            existed = plot.exists()
            record(plot_retrofit(original, result, plot, force=force), existed)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    for path in written:
        note(f"wrote {path}")
    return written
