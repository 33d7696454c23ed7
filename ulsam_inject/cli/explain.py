"""``ulsam-inject explain``: heat maps of models on images, side by side in one figure."""

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
    PretrainedOption,
    TrustOption,
    TrustRecipeOption,
    console,
    load_model,
    looks_like_file,
    note,
    print_json,
    progress,
)


def explain(
    models: list[str] = typer.Argument(
        ..., help="Models to compare: specs or 'inject --out' files (one column each)."
    ),
    image: list[Path] = typer.Option(
        ..., "--image", "-i", help="An image to explain (repeat for more; one row each)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write the figure here (.png or .svg)."
    ),
    layer: str | None = typer.Option(
        None,
        "--layer",
        help="The layer whose map is explained: a stage, any module, or a ULSAM block "
        "(e.g. features.13.ulsam). Default: the deepest feature map before pooling.",
    ),
    class_index: int | None = typer.Option(
        None, "--class", help="Explain this class index instead of each model's top-1."
    ),
    method: str = typer.Option(
        "gradcam++",
        "--method",
        help="gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, eigengradcam, "
        "gradcam-elementwise or scorecam.",
    ),
    attention: bool = typer.Option(
        False, "--attention", help="Also draw each ULSAM block's g attention maps."
    ),
    top_k: int = typer.Option(5, "--top-k", help="Predictions listed per model and image."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing figure."),
    json_output: bool = JsonOption,
    checkpoint: Path | None = CheckpointOption,
    pretrained: bool = PretrainedOption,
    input_size: str | None = InputSizeOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Grad-CAM++ heat maps (or another --method) of each model on each image."""
    from ulsam_inject.heatmaps import Subject, explain_subjects
    from ulsam_inject.heatmaps.figure import check_figure_path, save_figure
    from ulsam_inject.heatmaps.images import read_image
    from ulsam_inject.heatmaps.maps import check_method
    from ulsam_inject.train import data as train_data

    check_method(method)
    if top_k < 1:
        raise UlsamUsageError(f"--top-k must be at least 1, got {top_k}")
    if out is not None:
        check_figure_path(out, force=force)  # before any model is built
    for path in image:
        read_image(path)
    specs = [m for m in models if not looks_like_file(m)]
    if checkpoint is not None and len(specs) != 1:
        raise UlsamUsageError(
            f"--checkpoint goes with exactly one model spec among MODELS, got {len(specs)}"
        )
    subjects: list[Subject] = []
    for model in models:
        spec = not looks_like_file(model)
        loaded = load_model(
            model,
            checkpoint=checkpoint if spec else None,
            trust=trust_checkpoint,
            pretrained=pretrained and spec,
            trust_recipe=trust_recipe,
            kwargs_text=model_kwargs if spec else None,
            input_size=input_size,
        )
        config = train_data.data_config_for(loaded.module, loaded.source, loaded.input_size)
        taken = {s.name for s in subjects}
        name = model if model not in taken else f"{model} #{len(subjects) + 1}"
        subjects.append(Subject(name, loaded.module, config, None, loaded.source))
    progress(f"explaining {len(subjects)} model(s) on {len(image)} image(s) with {method}")
    result = explain_subjects(
        subjects,
        image,
        layer=layer,
        target_class=class_index,
        method=method,
        attention=attention,
        top_k=top_k,
    )
    if out is not None:
        written = save_figure(result.figure, out, force=force)
        note(f"wrote {written}")
    if json_output:
        print_json({**result.to_dict(), "method": method, "figure": str(out) if out else None})
        return
    console.print(_table(result))


def _table(result: Any) -> Table:
    table = Table(title="heat maps: explained class, peak (row, col) and top-10% mass")
    for column in ("image", "model", "layer", "top-1", "explained", "peak", "top-10% mass"):
        table.add_column(column, justify="left" if column not in ("peak",) else "right")
    for item in result.maps:
        best = item.predictions[0]
        mass = item.stats.top10_mass
        table.add_row(
            item.image,
            item.model,
            item.layer,
            f"{best.name} {100 * best.probability:.1f}%",
            f"{item.target.name} {100 * item.target.probability:.1f}%",
            f"{item.stats.peak[0]}, {item.stats.peak[1]}",
            "-" if mass is None else f"{100 * mass:.1f}%",
        )
    return table
