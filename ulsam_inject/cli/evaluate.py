"""``ulsam-inject evaluate``: top-1, top-5, loss and speed of models on an image folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ulsam_inject.errors import UlsamUsageError

from .common import (
    CheckpointOption,
    InputSizeOption,
    JsonOption,
    KwargsOption,
    TrustOption,
    TrustRecipeOption,
    console,
    load_model,
    looks_like_file,
    print_json,
    progress,
)
from .finetune import DeviceOption, InterpolationOption, MeanOption, StdOption, parse_floats


def evaluate(
    models: list[str] = typer.Argument(
        ..., help="Models to compare (the first is the reference): specs or 'inject --out' files."
    ),
    data: Path = typer.Option(
        ..., "--data", help="An ImageFolder split (DIR/val): DIR/val/CLASS/IMAGE."
    ),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    workers: int = typer.Option(2, "--workers", help="Data-loading processes (0: in this one)."),
    device: str = DeviceOption,
    mean: str | None = MeanOption,
    std: str | None = StdOption,
    interpolation: str | None = InterpolationOption,
    json_output: bool = JsonOption,
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Evaluate one or more models; with several, compare each with the first."""
    from ulsam_inject.train import data as train_data
    from ulsam_inject.train.evaluate import evaluate as run_evaluate

    mean_values, std_values = parse_floats(mean, "mean"), parse_floats(std, "std")
    if interpolation is not None and interpolation not in train_data.INTERPOLATIONS:
        raise UlsamUsageError(
            f"--interpolation {interpolation!r} is not one of "
            f"{', '.join(train_data.INTERPOLATIONS)}"
        )
    specs = [m for m in models if not looks_like_file(m)]
    if checkpoint is not None and len(specs) != 1:
        raise UlsamUsageError(
            f"--checkpoint goes with exactly one model spec among MODELS, got {len(specs)}"
        )
    scan = train_data.scan_folder(data)
    named: dict[str, Any] = {}
    datasets = []
    configs: dict[Any, Any] = {}
    for model in models:
        spec = not looks_like_file(model)
        loaded = load_model(
            model,
            checkpoint=checkpoint if spec else None,
            trust=trust_checkpoint,
            trust_recipe=trust_recipe,
            kwargs_text=model_kwargs if spec else None,
            input_size=input_size,
        )
        config = train_data.data_config_for(
            loaded.module,
            loaded.source,
            loaded.input_size,
            mean=mean_values,
            std=std_values,
            interpolation=interpolation,
        )
        if config not in configs:
            configs[config] = train_data.ImageFolderData(
                scan, train_data.build_transform(config, train=False), loaded.input_size[0]
            )
        name = model if model not in named else f"{model} #{len(named) + 1}"
        named[name] = loaded.module
        datasets.append(configs[config])
    progress(f"evaluating {len(named)} model(s) on {len(scan.samples)} images")
    report = run_evaluate(named, datasets, batch_size=batch_size, workers=workers, device=device)
    if json_output:
        print_json({**report.to_dict(), "data": str(data)})
        return
    console.print(_table(report))
    for comparison in report.comparisons:
        console.print(_comparison_text(comparison), highlight=False)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _table(report: Any) -> Table:
    table = Table(title=f"{report.models[0].images} images, {len(report.classes)} classes")
    for column in ("model", "top-1 %", "top-5 %", "loss", "images/s", "skipped"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for score in report.models:
        table.add_row(
            score.name,
            _pct(score.top1),
            _pct(score.top5),
            f"{score.loss:.4f}",
            f"{score.images_per_s:.1f}",
            str(score.skipped),
        )
    return table


def _comparison_text(comparison: Any) -> str:
    def changes(items: Any) -> str:
        return ", ".join(f"{c.name} {100 * c.delta:+.1f}" for c in items) or "none"

    return (
        f"{comparison.model} vs {comparison.reference}: top-1 agreement "
        f"{_pct(comparison.agreement)}%; gained most: {changes(comparison.gained)}; "
        f"lost most: {changes(comparison.lost)}"
    )
