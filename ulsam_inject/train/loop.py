"""The training and evaluation passes over a data loader, and the sums they report.

Both passes return :class:`Tally` objects of *sums* (loss, correct top-1/top-5, images,
per-class counts), so that the numbers of several processes add up exactly before they
are turned into means and accuracies.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ulsam_inject.errors import TrainingError
from ulsam_inject.train.data import Batch
from ulsam_inject.train.distributed import DistContext, all_reduce_sum

__all__ = ["StepInfo", "Tally", "evaluate_pass", "train_pass"]


@dataclass
class Tally:
    """Sums over a pass; :meth:`reduce` adds those of every process."""

    num_classes: int
    loss_sum: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0
    skipped: int = 0
    seconds: float = 0.0  # model time (forward, and backward + step when training)
    class_correct: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    class_total: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    first_skipped: str | None = None
    lr: float = math.nan  # the rate of the last step taken (training)

    def __post_init__(self) -> None:
        if self.class_total.numel() == 0:
            self.class_correct = torch.zeros(self.num_classes, dtype=torch.long)
            self.class_total = torch.zeros(self.num_classes, dtype=torch.long)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> torch.Tensor:
        """Count one batch; returns its top-1 predictions."""
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices.cpu()
        targets = targets.cpu()
        hit1 = top[:, 0] == targets
        self.correct1 += int(hit1.sum())
        self.correct5 += int((top == targets[:, None]).any(dim=1).sum())
        self.images += int(targets.numel())
        self.loss_sum += loss_sum
        self.class_total += torch.bincount(targets, minlength=self.num_classes)[: self.num_classes]
        self.class_correct += torch.bincount(targets[hit1], minlength=self.num_classes)[
            : self.num_classes
        ]
        return top[:, 0]

    def reduce(self, context: DistContext) -> Tally:
        """The tally of all processes (model time: the slowest process's)."""
        if not context.distributed:
            return self
        sums = torch.tensor(
            [self.loss_sum, self.correct1, self.correct5, self.images, self.skipped],
            dtype=torch.float64,
        )
        counts = torch.cat([self.class_correct, self.class_total])
        device = context.device if context.backend == "nccl" else torch.device("cpu")
        sums = all_reduce_sum(sums.to(device), context).cpu()
        counts = all_reduce_sum(counts.to(device), context).cpu()
        seconds = torch.tensor([self.seconds], dtype=torch.float64, device=device)
        if context.distributed:
            import torch.distributed as dist

            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return Tally(
            num_classes=self.num_classes,
            loss_sum=float(sums[0]),
            correct1=round(float(sums[1])),
            correct5=round(float(sums[2])),
            images=round(float(sums[3])),
            skipped=round(float(sums[4])),
            seconds=float(seconds.cpu()[0]),
            class_correct=counts[: self.num_classes].clone(),
            class_total=counts[self.num_classes :].clone(),
            first_skipped=self.first_skipped,
            lr=self.lr,
        )

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else math.nan

    @property
    def top1(self) -> float:
        return self.correct1 / self.images if self.images else math.nan

    @property
    def top5(self) -> float:
        return self.correct5 / self.images if self.images else math.nan

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


@dataclass(frozen=True)
class StepInfo:
    """Progress of a training pass, for a progress bar: after ``step`` of ``steps``."""

    epoch: int
    step: int
    steps: int
    loss: float
    images_per_s: float
    lr: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[None]:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(
    batch: Batch, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    assert batch.images is not None and batch.targets is not None
    images = batch.images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, batch.targets.to(device, non_blocking=True)


def _note_skips(tally: Tally, batch: Batch) -> None:
    tally.skipped += len(batch.skipped)
    if batch.skipped and tally.first_skipped is None:
        tally.first_skipped = batch.skipped[0].path


def train_pass(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    steps: int,
    epoch: int,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
    channels_last: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Tally:
    """One epoch of training (the model is in the train mode its phase set)."""
    tally = Tally(num_classes)
    for step, batch in enumerate(loader, start=1):
        _note_skips(tally, batch)
        if batch.images is None:
            continue
        images, targets = _to_device(batch, device, channels_last)
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, amp):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the training loss became {float(loss)} at epoch {epoch + 1}, step {step}; "
                f"lower the learning rate (--lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tally.lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        _sync(device)
        tally.seconds += time.perf_counter() - start
        with torch.no_grad():
            tally.add(logits.detach().float(), targets, float(loss) * targets.numel())
        if on_step is not None:
            on_step(
                StepInfo(
                    epoch, step, steps, float(loss), tally.images_per_s,
                    tally.lr,
                )
            )  # fmt: skip
    return tally


def evaluate_pass(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    device: torch.device,
    num_classes: int,
    amp: bool = False,
    channels_last: bool = False,
    predictions: list[torch.Tensor] | None = None,
) -> Tally:
    """Loss and accuracy of ``model`` in eval mode; top-1 predictions appended to ``predictions``.

    Skipped (unreadable) samples have no prediction; models evaluated over the same files
    skip the same samples, so their predictions stay aligned.
    """
    criterion = nn.CrossEntropyLoss(reduction="sum")
    tally = Tally(num_classes)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                _note_skips(tally, batch)
                if batch.images is None:
                    continue
                images, targets = _to_device(batch, device, channels_last)
                _sync(device)
                start = time.perf_counter()
                with _autocast(device, amp):
                    logits = model(images).float()
                _sync(device)
                tally.seconds += time.perf_counter() - start
                if logits.dim() != 2 or logits.shape[1] != num_classes:
                    raise TrainingError(
                        f"the model returns {tuple(logits.shape)} for a batch, expected "
                        f"(batch, {num_classes})"
                    )
                top = tally.add(logits, targets, float(criterion(logits, targets)))
                if predictions is not None:
                    predictions.append(top)
    finally:
        for module, flag in flags:
            module.training = flag
    return tally
