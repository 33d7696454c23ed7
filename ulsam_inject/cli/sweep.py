"""``ulsam-inject sweep``: every position set x mode x g costed (timed, trained) in one table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from ulsam_inject.block.module import DEFAULT_INIT, check_init
from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.io.fileio import check_output_path

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
from .finetune import WorkersOption
from .inject import _check_plot


def default_results_path(model: str) -> Path:
    """``sweep-<model>.jsonl`` in the current folder (``torchvision_mobilenet_v2``)."""
    slug = re.sub(r"[^0-9A-Za-z]+", "_", Path(model).name if "/" in model else model).strip("_")
    return Path(f"sweep-{slug or 'model'}.jsonl")


def sweep(
    model: str = typer.Argument(..., help=MODEL_HELP),
    at: str = typer.Option(
        ...,
        "--at",
        "-a",
        help="Position sets separated by ';', each as for 'inject --at': "
        "'features.13;features.16;features.13,features.16'.",
    ),
    groups: str = typer.Option("1,2,4,8,16", "--groups", "-g", help="The g values: 1,2,4,8,16."),
    mode: str = typer.Option("after", "--mode", "-m", help="after, replace, or after,replace."),
    bench: bool = typer.Option(False, "--bench", help="Time each configuration and the original."),
    batch: int = typer.Option(1, "--batch", min=1, help="--bench: batch size."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="--bench: CPU threads."),
    repeats: int = typer.Option(30, "--repeats", min=1, help="--bench: timed runs of each."),
    data: Path | None = typer.Option(
        None, "--data", help="ImageFolder tree with train/ and val/: fine-tune and score each."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="--data: epochs in all (10)."),
    warmup_epochs: int | None = typer.Option(
        None, "--warmup-epochs", help="--data: first epochs train only the new blocks (1)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="--data: rate of the warm-up (1e-3)."),
    finetune_lr: float | None = typer.Option(
        None, "--finetune-lr", help="--data: rate of the all-parameters phase (lr / 10)."
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", help="--data: batch (32)."),
    workers: int = WorkersOption,
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA when available), cpu, cuda: for --bench and --data."
    ),
    results: Path | None = typer.Option(
        None,
        "--results",
        help="JSON-lines file of finished configurations, resumed on a rerun (default with "
        "--data or --bench: sweep-MODEL.jsonl here; else none).",
    ),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write the rows as CSV."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Write a figure (.png or .svg): accuracy, latency or MACs vs g."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the --csv and --plot files."),
    seed: int = typer.Option(0, "--seed", help="Seed of the new blocks and of the training."),
    init: str | None = InitOption,
    json_output: bool = JsonOption,
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Sweep g, positions and modes: costs per configuration, latency and accuracy if asked."""
    import torch

    from ulsam_inject.sweeps.grid import check_group_values, check_mode_values, parse_list
    from ulsam_inject.sweeps.run import BenchSettings
    from ulsam_inject.sweeps.run import sweep as run_sweep
    from ulsam_inject.sweeps.table import render_sweep, write_csv

    # Malformed options and outputs that cannot be written fail before the model is built.
    group_values = check_group_values(parse_list(groups, "groups"))
    mode_values = check_mode_values(parse_list(mode, "mode"))
    init_value = check_init(DEFAULT_INIT if init is None else init)
    training = _training(
        data,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        lr=lr,
        finetune_lr=finetune_lr,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )
    outputs = [p for p in (csv_out, plot, results) if p is not None]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise UlsamUsageError("--csv, --plot and --results must name different files")
    if plot is not None:
        _check_plot(plot)
    for path in (csv_out, plot):
        if path is not None:
            check_output_path(path, force=force, protect=checkpoint)
    if results is None and (data is not None or bench):
        results = default_results_path(model)
    if results is not None and checkpoint is not None and results.resolve() == checkpoint.resolve():
        raise UlsamUsageError(f"--results {results} is the input checkpoint; choose another path")
    refuse_retrofitted(model, "sweep")
    torch.manual_seed(seed)  # a model without weights is the same on every run
    loaded = load_model(
        model,
        checkpoint=checkpoint,
        trust=trust_checkpoint,
        pretrained=pretrained,
        kwargs_text=model_kwargs,
        input_size=input_size,
        trust_recipe=trust_recipe,
    )
    long_run = data is not None or bench

    def on_start(index: int, total: int, config: Any) -> None:
        progress(f"[{index + 1}/{total}] {config.label()}")

    def on_row(index: int, total: int, row: Any) -> None:
        if long_run and row.status != "cached":
            took = f" in {row.seconds:.1f} s" if row.seconds is not None else ""
            note(f"[{index + 1}/{total}] {row.config.label()}: {row.status}{took}")

    result = run_sweep(
        loaded.module,
        at,
        groups=group_values,
        modes=mode_values,
        input_size=loaded.input_size,
        model_kwargs=loaded.source_kwargs,
        source=loaded.source,
        seed=seed,
        init=init_value,
        bench=BenchSettings(batch=batch, device=device, threads=threads, repeats=repeats)
        if bench
        else None,
        data=data,
        training=training,
        results=results,
        on_start=on_start,
        on_row=on_row,
    )
    for message in result.notes:
        note(message)
    written = []
    if csv_out is not None:
        written.append(write_csv(result, csv_out, force=force))
    if plot is not None:
        from ulsam_inject.sweeps.figure import plot_sweep

        written.append(plot_sweep(result, plot, force=force))
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(render_sweep(result))
    rows = (result.reference, *result.rows)
    cached = sum(row.status == "cached" for row in rows)
    skipped = sum(row.status == "skipped" for row in rows)
    if cached:
        note(f"{cached} of {len(rows)} rows read from {result.results} (cached)")
    if skipped:
        note(f"{skipped} combination(s) skipped: they do not fit the model (reasons listed)")
    if result.results is not None:
        note(f"results in {result.results}")
    for path in written:
        note(f"wrote {path}")


def _training(data: Path | None, **options: Any) -> dict[str, Any] | None:
    """The fine-tuning settings given (checked now), or None without --data."""
    given = {k: v for k, v in options.items() if v is not None}
    if data is None:
        training_only = ("epochs", "warmup_epochs", "lr", "finetune_lr", "batch_size")
        named = [k for k in training_only if k in given]
        if named:
            flags = ", ".join("--" + k.replace("_", "-") for k in named)
            raise UlsamUsageError(f"{flags} set(s) the fine-tuning of --data; give --data DIR")
        return None
    from ulsam_inject.train.finetune import FinetuneSettings

    FinetuneSettings(**given)  # refused here, before the model is built
    return given
