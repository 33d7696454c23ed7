"""``ulsam-inject finetune``: train the ULSAM blocks (then everything) on an image folder.

Also runs under torchrun (``python -m torch.distributed.run ... -m ulsam_inject finetune``):
every process trains, rank 0 alone prints and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from ulsam_inject.errors import OutputError, UlsamUsageError
from ulsam_inject.io.fileio import check_output_path

from .common import (
    MODEL_HELP,
    CheckpointOption,
    InitOption,
    InputSizeOption,
    KwargsOption,
    PretrainedOption,
    TrustOption,
    TrustRecipeOption,
    console,
    err_console,
    load_model,
    note,
    progress,
)
from .options import per_position

EPOCH_SCHEMA = "ulsam-inject.finetune-epoch/1"

DataOption = typer.Option(..., "--data", help="ImageFolder tree with train/ and val/ inside.")
MeanOption = typer.Option(None, "--mean", help="Normalisation mean, e.g. 0.485,0.456,0.406.")
StdOption = typer.Option(None, "--std", help="Normalisation std, e.g. 0.229,0.224,0.225.")
InterpolationOption = typer.Option(
    None, "--interpolation", help="bilinear, bicubic or nearest; default: the model's."
)
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda.")
WorkersOption = typer.Option(2, "--workers", help="Data-loading processes (0: in this one).")


def state_path_for(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable training state."""
    return out.with_name(out.name + ".resume.pt")


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UlsamUsageError(f"--{what} {text!r}: give comma-separated numbers") from None
    if not values:
        raise UlsamUsageError(f"--{what} {text!r}: give comma-separated numbers")
    return values


def finetune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Path = DataOption,
    out: Path = typer.Option(..., "--out", "-o", help="The best model: weights + recipe."),
    at: str | None = typer.Option(
        None, "--at", "-a", help="Inject ULSAM first at these positions (MODEL is a spec)."
    ),
    groups: list[str] | None = typer.Option(None, "--groups", "-g", help="g, or POSITION=g."),
    mode: list[str] | None = typer.Option(None, "--mode", "-m", help="after or replace."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs in all."),
    warmup_epochs: int = typer.Option(
        1, "--warmup-epochs", help="First epochs that train only the new blocks."
    ),
    warmup_head: bool = typer.Option(
        False, "--warmup-head", help="Train the head in the warm-up too (always if replaced)."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Rate of the warm-up."),
    finetune_lr: float | None = typer.Option(
        None, "--finetune-lr", help="Rate of the all-parameters phase (default: lr / 10)."
    ),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd."),
    weight_decay: float = typer.Option(
        0.05, "--weight-decay", help="Not applied to biases and norms."
    ),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing"),
    freeze_bn: bool = typer.Option(
        False, "--freeze-bn", help="Keep the original BatchNorms' statistics."
    ),
    sync_bn: bool = typer.Option(
        False, "--sync-bn", help="Under torchrun: BatchNorm statistics over all processes."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", "-b", help="Global batch (split across processes)."
    ),
    workers: int = WorkersOption,
    device: str = DeviceOption,
    num_classes: int | None = typer.Option(
        None, "--num-classes", help="Replace the head with one for N classes."
    ),
    mean: str | None = MeanOption,
    std: str | None = StdOption,
    interpolation: str | None = InterpolationOption,
    seed: int = typer.Option(0, "--seed", help="Same seed, same run (on the CPU: same weights)."),
    init: str | None = InitOption,
    resume: Path | None = typer.Option(
        None, "--resume", help="Continue an interrupted run from its OUT.resume.pt."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace OUT, and start over an interrupted run."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="JSON lines on stdout: the report, one per epoch, the result."
    ),
    checkpoint: Path | None = CheckpointOption,
    input_size: str | None = InputSizeOption,
    trust_checkpoint: bool = TrustOption,
    trust_recipe: bool = TrustRecipeOption,
    pretrained: bool = PretrainedOption,
    model_kwargs: str | None = KwargsOption,
) -> None:
    """Fine-tune a retrofitted model: ULSAM blocks first, then all parameters; keep the best."""
    import torch

    from ulsam_inject.block.module import DEFAULT_INIT, check_init
    from ulsam_inject.surgery.inject import inject as inject_model
    from ulsam_inject.surgery.report import render_report
    from ulsam_inject.train import data as train_data
    from ulsam_inject.train.distributed import init_from_env, shutdown
    from ulsam_inject.train.finetune import FinetuneSettings, read_state
    from ulsam_inject.train.finetune import finetune as run_finetune
    from ulsam_inject.train.head import replace_head

    # Everything that can be refused cheaply is refused before the model is built.
    settings = FinetuneSettings(
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        lr=lr,
        finetune_lr=finetune_lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        batch_size=batch_size,
        workers=workers,
        device=device,
        freeze_bn=freeze_bn,
        sync_bn=sync_bn,
        warmup_head=warmup_head or num_classes is not None,
        seed=seed,
    )
    groups_value = per_position(groups, 4, what="groups", as_int=True)
    mode_value = per_position(mode, "after", what="mode", as_int=False)
    init_value = check_init(DEFAULT_INIT if init is None else init)
    mean_values, std_values = parse_floats(mean, "mean"), parse_floats(std, "std")
    if interpolation is not None and interpolation not in train_data.INTERPOLATIONS:
        raise UlsamUsageError(
            f"--interpolation {interpolation!r} is not one of "
            f"{', '.join(train_data.INTERPOLATIONS)}"
        )
    if num_classes is not None and num_classes < 1:
        raise UlsamUsageError(f"--num-classes must be a positive integer, got {num_classes}")
    check_output_path(out, force=force, protect=checkpoint)
    state_path = state_path_for(out)
    if resume is not None:
        read_state(resume, None)  # a fine-tuning checkpoint at all? (its run: checked later)
    elif state_path.exists() and not force:
        raise OutputError(
            f"{state_path} holds an interrupted run: continue it with --resume {state_path}, "
            f"or start over with --force"
        )
    train_dir, val_dir = train_data.find_splits(data)
    train_scan, val_scan = train_data.scan_folder(train_dir), train_data.scan_folder(val_dir)
    train_data.check_same_classes(train_scan, val_scan)

    context = init_from_env(device)
    try:
        torch.manual_seed(seed)  # a new head and new blocks start the same way every time
        loaded = load_model(
            model,
            checkpoint=checkpoint,
            trust=trust_checkpoint,
            trust_recipe=trust_recipe,
            pretrained=pretrained,
            kwargs_text=model_kwargs,
            input_size=input_size,
        )
        kwargs = dict(loaded.source_kwargs)
        messages: list[str] = []
        if num_classes is not None:
            messages.append(replace_head(loaded.module, num_classes))
            kwargs["num_classes"] = num_classes
        if loaded.retrofit is not None:
            if at is not None:
                raise UlsamUsageError(
                    f"{model} is already retrofitted: its blocks are trained as they are; "
                    f"drop --at, or inject into its source model ({loaded.source})"
                )
            if init is not None:
                raise UlsamUsageError(
                    f"{model} is already retrofitted: its blocks start from its weights; "
                    f"drop --init, or inject into its source model ({loaded.source})"
                )
            retrofit = dataclasses.replace(loaded.retrofit, model=loaded.module).with_source(
                loaded.source, kwargs
            )
        else:
            if at is None:
                raise UlsamUsageError(
                    f"{model} is a model spec: say where ULSAM goes with --at (e.g. --at "
                    f"features.13), or give a file written by 'inject --out'"
                )
            progress(f"tracing and rewriting at {'x'.join(map(str, loaded.input_size))}")
            retrofit = inject_model(
                loaded.module,
                at=at,
                groups=groups_value,
                mode=mode_value,
                input_size=loaded.input_size,
                init=init_value,
            ).with_source(loaded.source, kwargs)
        if num_classes is not None:
            _check_rebuild(retrofit)
        config = train_data.data_config_for(
            loaded.module,
            loaded.source,
            loaded.input_size,
            mean=mean_values,
            std=std_values,
            interpolation=interpolation,
        )
        channels = loaded.input_size[0]
        train_set = train_data.ImageFolderData(
            train_scan, train_data.build_transform(config, train=True), channels
        )
        val_set = train_data.ImageFolderData(
            val_scan, train_data.build_transform(config, train=False), channels
        )
        main = context.is_main
        announced: list[bool] = []

        def announce() -> None:
            """What was changed, told once training has started (a refusal stays one line)."""
            if announced or not main:
                return
            announced.append(True)
            for message in messages:
                note(message)
            if retrofit.report is not None and loaded.retrofit is None:
                if json_output:
                    _json_line(retrofit.report.to_dict())
                else:
                    console.print(render_report(retrofit.report, dry_run=False))

        run_info = {
            "recipe": retrofit.recipe(),
            "data": str(Path(data).resolve()),
            "classes": list(train_scan.classes),
            "data_config": config.to_dict(),
        }

        def on_epoch(record: Any) -> None:
            if not main:
                return
            announce()
            if json_output:
                _json_line({"schema": EPOCH_SCHEMA, **record.to_dict()})
            else:
                console.print(_epoch_line(record, epochs), highlight=False)

        with _progress_bar(main) as bar_step, _sigterm_interrupts():

            def on_step(info: Any) -> None:
                announce()
                if bar_step is not None:
                    bar_step(info)

            try:
                result = run_finetune(
                    retrofit.model,
                    train_set,
                    val_set,
                    checkpoint=state_path,
                    resume=resume,
                    run_info=run_info,
                    on_epoch=on_epoch,
                    on_step=on_step,
                    context=context,
                    **settings.to_dict(),
                )
            except KeyboardInterrupt:
                if main and state_path.exists():
                    note(f"interrupted: continue with --resume {state_path}")
                raise
        if not main:
            return
        from ulsam_inject.io.artifact import save

        training = {
            **result.to_dict(),
            "classes": list(train_scan.classes),
            "data": str(Path(data).resolve()),
            "data_config": config.to_dict(),
        }
        training.pop("schema")
        written = save(
            dataclasses.replace(retrofit, model=result.model),
            out,
            force=force,
            protect=checkpoint,
            extra={"training": training},
        )
        with contextlib.suppress(FileNotFoundError):
            state_path.unlink()
        if json_output:
            _json_line({**result.to_dict(), "written": [str(written)]})
        else:
            best = result.best
            console.print(
                f"best: epoch {best.epoch}, val top-1 {100 * best.val_top1:.2f}%, "
                f"top-5 {100 * best.val_top5:.2f}%",
                highlight=False,
            )
        skipped = sum(record.skipped for record in result.history)
        if skipped:
            note(f"skipped {skipped} unreadable image(s) over the run")
        note(f"wrote {written}")
    finally:
        shutdown(context)


def _check_rebuild(retrofit: Any) -> None:
    """The recipe with the new class count must rebuild this very model (checked before
    training, not after it)."""
    from ulsam_inject.errors import ModelSpecError
    from ulsam_inject.surgery.inject import inject as inject_model

    recipe = retrofit.recipe()
    plan = recipe["plan"]
    try:
        rebuilt = inject_model(
            recipe["model"],
            at=[item["at"] for item in plan],
            groups={item["at"]: item["groups"] for item in plan},
            mode={item["at"]: item["mode"] for item in plan},
            input_size=tuple(recipe["input_size"]),
            model_kwargs=recipe["model_kwargs"],
            report=False,
        )
    except ModelSpecError as error:
        raise UlsamUsageError(
            f"--num-classes: {recipe['model']} cannot be rebuilt with num_classes ({error})"
        ) from None
    ours = {k: tuple(v.shape) for k, v in retrofit.model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in rebuilt.model.state_dict().items()}
    if ours != theirs:
        raise UlsamUsageError(
            f"--num-classes: {recipe['model']} built with num_classes does not have the "
            f"replaced head's shape, so the result could not be loaded again"
        )


def _json_line(document: Any) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def _epoch_line(record: Any, epochs: int) -> str:
    return (
        f"epoch {record.epoch}/{epochs} {record.phase:6s} lr {record.lr:.2e} "
        f"train loss {record.train_loss:.4f} top-1 {100 * record.train_top1:5.1f}% | "
        f"val loss {record.val_loss:.4f} top-1 {100 * record.val_top1:5.1f}% "
        f"top-5 {100 * record.val_top5:5.1f}% | {record.train_images_per_s:.0f} img/s"
        + (" *" if record.best else "")
    )


@contextlib.contextmanager
def _progress_bar(main: bool) -> Iterator[Any]:
    """A rich progress bar on stderr (steps, loss, images/s, ETA), only on a terminal."""
    if not (main and err_console.is_terminal):
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[speed]:.0f} img/s"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=None, epoch=0, loss=float("nan"), speed=0.0)

        def on_step(info: Any) -> None:
            if info.step == 1:
                bar.reset(task, total=info.steps)
            bar.update(
                task,
                completed=info.step,
                epoch=info.epoch + 1,
                loss=info.loss,
                speed=info.images_per_s,
            )

        yield on_step


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (torchrun stopping its workers, a scheduler's kill) as Ctrl-C: files being
    written are cleaned up and the last checkpoint stays whole."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
