"""The sweep: every (position set, mode, g) retrofitted, counted, and optionally timed and trained.

Each configuration goes through :func:`ulsam_inject.inject` exactly as ``ulsam-inject
inject --dry-run`` does, so its costs are that command's numbers. The original model is
the reference row: its costs, its latency (timed against itself, so its ratio shows the
noise), and, with data, its accuracy after the same fine-tuning budget (see
:func:`sweep`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ulsam_inject.block.module import DEFAULT_INIT, check_init
from ulsam_inject.cost.count import count
from ulsam_inject.errors import GroupsError, ReplaceError, UlsamUsageError, first_line
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, check_input_size
from ulsam_inject.guards import check_input_limits, check_model
from ulsam_inject.measure.bench import measure_latency
from ulsam_inject.surgery.inject import inject
from ulsam_inject.surgery.positions import PositionSpec
from ulsam_inject.surgery.report import Report
from ulsam_inject.surgery.seeing import find_stages, trace_model
from ulsam_inject.sweeps.grid import (
    Configuration,
    check_group_values,
    check_mode_values,
    make_grid,
    original,
    split_sets,
)
from ulsam_inject.sweeps.results import open_results
from ulsam_inject.sweeps.row import SweepRow
from ulsam_inject.train.evaluate import evaluate
from ulsam_inject.train.finetune import FinetuneSettings, finetune

SCHEMA = "ulsam-inject.sweep/1"
DEFAULT_SWEEP_GROUPS = (1, 2, 4, 8, 16)
SKIPPED_ERRORS = (GroupsError, ReplaceError)
"""Errors of a combination that does not fit the model: listed as skipped, not raised."""


@dataclass(frozen=True)
class BenchSettings:
    """How each configuration is timed (see :func:`ulsam_inject.measure_latency`)."""

    batch: int = 1
    device: str = "auto"
    threads: int | None = None
    warmup: int = 5
    repeats: int = 30

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """The sweep's rows, the original model's reference row, and what they were run with."""

    model: str | None
    input_size: tuple[int, int, int]
    settings: Mapping[str, Any]
    reference: SweepRow
    rows: tuple[SweepRow, ...]
    results: Path | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """The ``ulsam-inject.sweep/1`` JSON document."""
        return {
            "schema": SCHEMA,
            "model": self.model,
            "input_size": list(self.input_size),
            "settings": dict(self.settings),
            "results": str(self.results) if self.results is not None else None,
            "reference": self.reference.to_dict(),
            "rows": [row.to_dict() for row in self.rows],
            "notes": list(self.notes),
        }


StartCallback = Callable[[int, int, Configuration], None]
RowCallback = Callable[[int, int, SweepRow], None]


def sweep(
    model: nn.Module | str,
    positions: str | Sequence[PositionSpec],
    groups: Sequence[int] = DEFAULT_SWEEP_GROUPS,
    modes: str | Sequence[str] = ("after",),
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    source: str | None = None,
    seed: int = 0,
    init: str = DEFAULT_INIT,
    bench: BenchSettings | bool | None = None,
    data: str | os.PathLike[str] | tuple[Dataset[Any], Dataset[Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    results: str | os.PathLike[str] | None = None,
    on_start: StartCallback | None = None,
    on_row: RowCallback | None = None,
) -> SweepResult:
    """Retrofit ``model`` at every position set x mode x g; report costs (and more) per row.

    ``positions`` is a list of position sets, each an ``at`` of :func:`ulsam_inject.inject`
    (``"13"``, ``"features.13,features.16"``, a list), or one string with sets separated by
    ``;``. Every configuration's costs are its :class:`~ulsam_inject.Report`'s; a
    combination that does not fit (g not dividing the channels, ``replace`` on a stage
    that changes the shape) is a ``"skipped"`` row with the reason. ``seed`` makes the new
    blocks (and a model built from a spec) the same on every run.

    ``bench``: time each configuration against the original (``True`` or a
    :class:`BenchSettings`). ``data``: an ImageFolder tree with ``train/`` and ``val/`` (or
    a ``(train, val)`` pair of datasets); each configuration is fine-tuned with
    :func:`ulsam_inject.finetune` (``training`` holds its settings, e.g. ``{"epochs": 3}``)
    and scored by its best epoch's validation top-1/top-5. The original is fine-tuned
    with the same budget: a warm-up trains only the new blocks and leaves the original
    network bitwise unchanged, so the original's counterpart of those epochs is itself as
    it is (scored as epoch 0), followed by the same all-parameters phase (``epochs -
    warmup_epochs`` epochs at the same rate and cosine decay); its best is reported.

    ``results``: a JSON-lines file; every finished configuration is appended to it, and
    configurations already there (same settings) are not run again (status ``"cached"``).
    ``source`` and ``model_kwargs`` name the spec an ``nn.Module`` was built from (recorded
    with the results, and used to find its preprocessing); a spec string is built here.

    Example:
        >>> import torchvision
        >>> from ulsam_inject import sweep
        >>> net = torchvision.models.mobilenet_v2()
        >>> result = sweep(net, ["features.13", "features.16"], groups=[4, 7])
        >>> for row in result.rows:
        ...     print(row.config.label(), row.status)
        features.13 g=4 after done
        features.13 g=7 after skipped
        features.16 g=4 after done
        features.16 g=7 after skipped
        >>> result.rows[0].delta("macs")
        37632
    """
    check_init(init)
    sets = split_sets(positions) if isinstance(positions, str) else list(positions)
    group_values = check_group_values(groups)
    mode_values = check_mode_values([modes] if isinstance(modes, str) else modes)
    bench_settings = BenchSettings() if bench is True else (bench or None)
    train_settings = None
    if data is not None:
        train_settings = _training_settings({"seed": seed, **(training or {})})
    if training is not None and data is None:
        raise UlsamUsageError("training settings were given without data to train on")
    kwargs: dict[str, Any] = dict(model_kwargs or {})
    if isinstance(model, str):
        from ulsam_inject.io.sources import build_model, parse_model_spec

        spec = parse_model_spec(model, model_kwargs)
        source, kwargs = spec.spec, dict(spec.kwargs)
        torch.manual_seed(seed)  # a model without weights starts the same every run
        model = build_model(spec).eval()
    check_model(model, function="sweep", accepted="an nn.Module or a model spec string")
    check_input_size(input_size)
    check_input_limits(input_size)

    traced = trace_model(copy.deepcopy(model), input_size)  # as inject() sees it
    grid = make_grid(sets, group_values, mode_values, find_stages(traced), traced)
    datasets = _datasets(data, model, source, input_size) if data is not None else None
    settings = {
        "model": source or f"<{type(model).__module__}.{type(model).__qualname__}>",
        "model_kwargs": kwargs,
        "weights": weights_fingerprint(model),
        "input_size": list(input_size),
        "seed": seed,
        "init": init,
        "bench": bench_settings.to_dict() if bench_settings is not None else None,
        "training": _training_key(train_settings),
        "data": datasets[2] if datasets is not None else None,
    }
    store = open_results(results, settings) if results is not None else None

    runner = _Runner(
        model, source, input_size, seed, init, bench_settings, train_settings, datasets
    )
    configs = [original(), *grid]
    rows: list[SweepRow] = []
    for index, config in enumerate(configs):
        cached = store.get(config.key()) if store is not None else None
        if cached is not None:
            row = SweepRow.from_stored(config, cached)
        else:
            if on_start is not None:
                on_start(index, len(configs), config)
            row = runner.run(config, count(traced) if config.is_original else None)
            if store is not None and row.status == "done":
                store.append(config.key(), row.stored())
        rows.append(row)
        if on_row is not None:
            on_row(index, len(configs), row)
    return SweepResult(
        model=source,
        input_size=tuple(input_size),  # type: ignore[arg-type]
        settings=settings,
        reference=rows[0],
        rows=tuple(rows[1:]),
        results=store.path if store is not None else None,
        notes=tuple(store.notes) if store is not None else (),
    )


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{list(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class _Runner:
    """Runs one configuration: inject (costs), then time and train as asked."""

    def __init__(
        self,
        model: nn.Module,
        source: str | None,
        input_size: tuple[int, int, int],
        seed: int,
        init: str,
        bench: BenchSettings | None,
        training: FinetuneSettings | None,
        datasets: tuple[Dataset[Any], Dataset[Any], dict[str, Any]] | None,
    ) -> None:
        self.model, self.source, self.input_size = model, source, input_size
        self.seed, self.init = seed, init
        self.bench, self.training, self.datasets = bench, training, datasets

    def run(self, config: Configuration, original_cost: Any) -> SweepRow:
        start = time.perf_counter()
        if config.is_original:
            summary = original_cost.summary()
            report = Report(
                self.source, self.input_size, summary, dict(summary), (), original_cost.uncounted
            )
            measured: nn.Module = self.model
        else:
            try:
                retrofit = inject(
                    self.model,
                    at=list(config.stages),
                    groups=int(config.groups or 0),
                    mode=str(config.mode),
                    input_size=self.input_size,
                    seed=self.seed,
                    init=self.init,
                )
            except SKIPPED_ERRORS as error:
                return SweepRow(config, "skipped", reason=first_line(error, limit=None))
            assert retrofit.report is not None
            report, measured = retrofit.report, retrofit.model
        document = report.to_dict()
        cost = {key: document[key] for key in ("before", "after", "change", "blocks", "uncounted")}
        latency = self._time(measured) if self.bench is not None else None
        accuracy = self._train(measured, config) if self.datasets is not None else None
        return SweepRow(
            config,
            "done",
            cost=cost,
            latency=latency,
            accuracy=accuracy,
            seconds=round(time.perf_counter() - start, 3),
        )

    def _time(self, measured: nn.Module) -> dict[str, Any]:
        assert self.bench is not None
        report = measure_latency(self.model, measured, self.input_size, **self.bench.to_dict())
        return {
            "median_ms": report.after.median_ms,
            "p10_ms": report.after.p10_ms,
            "p90_ms": report.after.p90_ms,
            "reference_ms": report.before.median_ms,
            "ratio": report.ratio,
            "device": report.device,
            "threads": report.threads,
            "batch": report.batch,
        }

    def _train(self, measured: nn.Module, config: Configuration) -> dict[str, Any]:
        if config.is_original:
            return self._train_original(measured)
        assert self.datasets is not None and self.training is not None
        train_set, val_set, _ = self.datasets
        result = finetune(measured, train_set, val_set, **self.training.to_dict())
        best = result.best
        return {
            "top1": best.val_top1,
            "top5": best.val_top5,
            "loss": best.val_loss,
            "best_epoch": result.best_epoch,
        }

    def _train_original(self, model: nn.Module) -> dict[str, Any]:
        """The original on a retrofit's budget, epoch for epoch.

        A retrofit's warm-up epochs train only its new blocks: the original network in them
        is bitwise unchanged. The original's counterpart of those epochs is the original
        as it is (scored as epoch 0 when there is a warm-up), followed by the same
        all-parameters phase (``epochs - warmup_epochs`` epochs at the same rate and
        decay, numbered as the retrofits' are); the best of these is reported, as the
        retrofits' best epoch is.
        """
        assert self.datasets is not None and self.training is not None
        train_set, val_set, _ = self.datasets
        config = self.training
        candidates: list[dict[str, Any]] = []
        if config.warmup_epochs > 0 or config.epochs == config.warmup_epochs:
            score = evaluate(
                {"original": model},
                val_set,
                batch_size=config.batch_size,
                workers=config.workers,
                device=config.device,
            ).models[0]
            candidates.append(
                {"top1": score.top1, "top5": score.top5, "loss": score.loss, "best_epoch": 0}
            )
        epochs = config.epochs - config.warmup_epochs
        if epochs > 0:
            rate = config.main_lr
            settings = config.to_dict()
            settings.update(epochs=epochs, warmup_epochs=0, lr=rate, finetune_lr=rate)
            result = finetune(model, train_set, val_set, **settings)
            best = result.best
            candidates.append(
                {
                    "top1": best.val_top1,
                    "top5": best.val_top5,
                    "loss": best.val_loss,
                    "best_epoch": config.warmup_epochs + result.best_epoch,
                }
            )
        # The earlier wins a tie, as in finetune's choice of the best epoch.
        return max(candidates, key=lambda c: (c["top1"], -c["best_epoch"]))


def _training_settings(training: Mapping[str, Any] | None) -> FinetuneSettings:
    try:
        return FinetuneSettings(**dict(training or {}))
    except TypeError as error:
        raise UlsamUsageError(f"training settings: {first_line(error)}") from None


def _training_key(settings: FinetuneSettings | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    data: dict[str, Any] = settings.to_dict()
    data.pop("workers")  # how fast data is read changes no result
    return data


def _datasets(
    data: str | os.PathLike[str] | tuple[Dataset[Any], Dataset[Any]],
    model: nn.Module,
    source: str | None,
    input_size: tuple[int, int, int],
) -> tuple[Dataset[Any], Dataset[Any], dict[str, Any]]:
    """Training and validation sets, and what identifies them in the results file."""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise UlsamUsageError(f"data is a folder or a (train, val) pair, got {len(data)} items")
        train_set, val_set = data
        identity: dict[str, Any] = {"path": None}
    else:
        from ulsam_inject.train import data as train_data

        train_dir, val_dir = train_data.find_splits(data)
        train_scan, val_scan = train_data.scan_folder(train_dir), train_data.scan_folder(val_dir)
        train_data.check_same_classes(train_scan, val_scan)
        config = train_data.data_config_for(model, source, input_size)
        channels = input_size[0]
        train_set = train_data.ImageFolderData(
            train_scan, train_data.build_transform(config, train=True), channels
        )
        val_set = train_data.ImageFolderData(
            val_scan, train_data.build_transform(config, train=False), channels
        )
        identity = {
            "path": str(Path(data).resolve()),
            "classes": list(train_scan.classes),
            "data_config": config.to_dict(),
        }
    identity["train_images"] = len(train_set)  # type: ignore[arg-type]
    identity["val_images"] = len(val_set)  # type: ignore[arg-type]
    return train_set, val_set, identity
