"""Evaluating models side by side: :func:`evaluate` -> :class:`EvaluateReport`.

Each model's top-1, top-5, mean cross-entropy and images/s (model time only: the forward
passes, without data loading); with two or more models, each one is compared with the
first: how often their top-1 predictions agree, and the classes whose accuracy gained and
lost most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ulsam_inject.errors import DataError, UlsamUsageError
from ulsam_inject.train.data import EpochKeys, SeededSamples, collate, sample_shape
from ulsam_inject.train.distributed import resolve_device
from ulsam_inject.train.finetune import ShardSampler
from ulsam_inject.train.head import num_outputs
from ulsam_inject.train.loop import evaluate_pass

__all__ = ["SCHEMA", "ClassChange", "Comparison", "EvaluateReport", "ModelScore", "evaluate"]

SCHEMA = "ulsam-inject.evaluate/1"


@dataclass(frozen=True)
class ModelScore:
    """One model's numbers; accuracies are fractions in [0, 1], per class by class index."""

    name: str
    top1: float
    top5: float
    loss: float
    images: int
    skipped: int
    images_per_s: float
    per_class: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "images": self.images,
            "skipped": self.skipped,
            "images_per_s": self.images_per_s,
            "per_class": list(self.per_class),
        }


@dataclass(frozen=True)
class ClassChange:
    """A class's accuracy in the reference model and in the other one."""

    name: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        return self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.name, "before": self.before, "after": self.after, "delta": self.delta}


@dataclass(frozen=True)
class Comparison:
    """``model`` against ``reference`` (the first model) on the same images."""

    reference: str
    model: str
    agreement: float
    gained: tuple[ClassChange, ...]
    lost: tuple[ClassChange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "model": self.model,
            "top1_agreement": self.agreement,
            "gained": [c.to_dict() for c in self.gained],
            "lost": [c.to_dict() for c in self.lost],
        }


@dataclass(frozen=True)
class EvaluateReport:
    """Scores of each model and comparisons with the first; ``to_dict()`` is the JSON."""

    models: tuple[ModelScore, ...]
    comparisons: tuple[Comparison, ...]
    classes: tuple[str, ...]
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "device": self.device,
            "classes": list(self.classes),
            "models": [m.to_dict() for m in self.models],
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def evaluate(
    models: Mapping[str, nn.Module] | Sequence[nn.Module],
    data: Dataset[Any] | Sequence[Dataset[Any]],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    classes: Sequence[str] | None = None,
    top_classes: int = 5,
) -> EvaluateReport:
    """Evaluate ``models`` on ``data`` (one map-style dataset, or one per model over the same
    images in the same order, e.g. when their preprocessing differs).

    ``models`` is a mapping name -> module or a sequence (named ``model1``, ``model2``, ...).
    The models are not changed (their train/eval flags are restored). Class names come from
    ``classes``, else the dataset's ``classes`` attribute, else the indices.
    """
    named = dict(models) if isinstance(models, Mapping) else {
        f"model{i + 1}": m for i, m in enumerate(models)
    }  # fmt: skip
    if not named:
        raise UlsamUsageError("evaluate needs at least one model")
    datasets = list(data) if isinstance(data, Sequence) and not isinstance(data, Dataset) else None
    if datasets is None:
        datasets = [data] * len(named)  # type: ignore[list-item]
    if len(datasets) != len(named):
        raise UlsamUsageError(f"{len(named)} models and {len(datasets)} data sets: give one each")
    lengths = {len(d) for d in datasets}  # type: ignore[arg-type]
    if len(lengths) != 1:
        raise DataError(f"the data sets hold different numbers of images: {sorted(lengths)}")
    if batch_size < 1:
        raise UlsamUsageError(f"batch size must be at least 1, got {batch_size}")
    target = resolve_device(device)
    names = list(classes or getattr(datasets[0], "classes", None) or [])

    scores: list[ModelScore] = []
    predictions: list[torch.Tensor] = []
    for (name, model), dataset in zip(named.items(), datasets):
        parameter = next(model.parameters(), None)
        home = parameter.device if parameter is not None else torch.device("cpu")
        loader = DataLoader(
            SeededSamples(dataset, 0),
            batch_size=batch_size,
            sampler=EpochKeys(ShardSampler(len(dataset)), 0),  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=collate,
            pin_memory=target.type == "cuda",
        )
        outputs = num_outputs(model, sample_shape(dataset))
        if names and len(names) != outputs:
            raise DataError(f"the data has {len(names)} classes and model {name} scores {outputs}")
        found: list[torch.Tensor] = []
        try:
            model.to(target)
            tally = evaluate_pass(
                model, loader, device=target, num_classes=outputs, predictions=found
            )
        finally:
            model.to(home)
        if not names:
            names = [str(i) for i in range(outputs)]
        per_class = tuple(
            (c / t) if t else math.nan
            for c, t in zip(tally.class_correct.tolist(), tally.class_total.tolist())
        )
        scores.append(
            ModelScore(
                name, tally.top1, tally.top5, tally.loss, tally.images, tally.skipped,
                tally.images_per_s, per_class,
            )
        )  # fmt: skip
        predictions.append(torch.cat(found) if found else torch.zeros(0, dtype=torch.long))

    comparisons = tuple(
        _compare(scores[0], scores[i], predictions[0], predictions[i], names, top_classes)
        for i in range(1, len(scores))
    )
    return EvaluateReport(tuple(scores), comparisons, tuple(names), str(target))


def _compare(
    reference: ModelScore,
    other: ModelScore,
    ref_pred: torch.Tensor,
    other_pred: torch.Tensor,
    names: Sequence[str],
    top: int,
) -> Comparison:
    agreement = (
        float((ref_pred == other_pred).float().mean())
        if len(ref_pred) == len(other_pred) and len(ref_pred)
        else math.nan
    )
    changes = [
        ClassChange(names[i] if i < len(names) else str(i), before, after)
        for i, (before, after) in enumerate(zip(reference.per_class, other.per_class))
        if not (math.isnan(before) or math.isnan(after))
    ]
    gained = sorted((c for c in changes if c.delta > 0), key=lambda c: -c.delta)[:top]
    lost = sorted((c for c in changes if c.delta < 0), key=lambda c: c.delta)[:top]
    return Comparison(reference.name, other.name, agreement, tuple(gained), tuple(lost))
