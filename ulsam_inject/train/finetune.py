"""Fine-tuning a retrofitted model: :func:`finetune` over any map-style datasets.

The schedule is :mod:`ulsam_inject.train.schedule`'s (warm-up of the new blocks, then all
parameters at a lower rate with a cosine decay). The best epoch by validation top-1 is
kept. Under torchrun every process runs this function; the data is sharded with a
``DistributedSampler``, gradients are averaged by ``DistributedDataParallel``, metrics are
summed over processes, and only rank 0 writes the checkpoint.

Repeatability: the global batch (``batch_size``) is split evenly across processes; each
sample's augmentation is seeded by (seed, epoch, index) (:class:`~.data.SeededSamples`);
the shuffling order is the ``DistributedSampler``'s for (seed, epoch). Two runs with the
same seed on the CPU give the same weights, and a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ulsam_inject.errors import DataError, ResumeError, UlsamUsageError
from ulsam_inject.io.fileio import atomic_write
from ulsam_inject.train.data import EpochKeys, SeededSamples, collate, sample_shape
from ulsam_inject.train.distributed import DistContext, convert_sync_bn, init_from_env
from ulsam_inject.train.head import find_head, num_outputs
from ulsam_inject.train.loop import StepInfo, Tally, evaluate_pass, train_pass
from ulsam_inject.train.schedule import (
    OPTIMIZERS,
    find_new_modules,
    make_optimizer,
    make_scheduler,
    phase_of,
    set_phase,
)

__all__ = [
    "STATE_FORMAT",
    "EpochRecord",
    "FinetuneResult",
    "FinetuneSettings",
    "ShardSampler",
    "finetune",
]

STATE_FORMAT = "ulsam-inject.finetune-state/1"
RESULT_SCHEMA = "ulsam-inject.finetune/1"


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that shapes a fine-tuning run (see :func:`finetune`)."""

    epochs: int = 10
    warmup_epochs: int = 1
    lr: float = 1e-3
    finetune_lr: float | None = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    batch_size: int = 32
    workers: int = 0
    device: str = "auto"
    freeze_bn: bool = False
    sync_bn: bool = False
    warmup_head: bool = False
    seed: int = 0
    amp: bool | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(
                f"warmup epochs must be between 0 and epochs ({self.epochs}), got "
                f"{self.warmup_epochs}"
            )
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            problems.append(f"finetune lr must be positive, got {self.finetune_lr}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0:
            problems.append(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1:
            problems.append(f"batch size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device {self.device!r} is not one of auto, cpu, cuda")
        if problems:
            raise UlsamUsageError("; ".join(problems))

    @property
    def main_lr(self) -> float:
        """The rate of the all-parameters phase (before its cosine decay)."""
        return self.finetune_lr if self.finetune_lr is not None else self.lr / 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did; accuracies are fractions in [0, 1]."""

    epoch: int  # 1-based
    phase: str
    lr: float
    train_loss: float
    train_top1: float
    train_images_per_s: float
    val_loss: float
    val_top1: float
    val_top5: float
    val_images_per_s: float
    skipped: int
    best: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """The outcome of :func:`finetune`: the best model (by validation top-1) and the log."""

    model: nn.Module
    best_epoch: int
    history: tuple[EpochRecord, ...]
    settings: FinetuneSettings
    num_classes: int
    new_modules: tuple[str, ...]
    head: str | None
    world_size: int = 1
    resumed_at_epoch: int | None = None

    @property
    def best(self) -> EpochRecord:
        return self.history[self.best_epoch - 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RESULT_SCHEMA,
            "best_epoch": self.best_epoch,
            "best": self.best.to_dict(),
            "num_classes": self.num_classes,
            "new_modules": list(self.new_modules),
            "head": self.head,
            "world_size": self.world_size,
            "resumed_at_epoch": self.resumed_at_epoch,
            "settings": self.settings.to_dict(),
            "history": [record.to_dict() for record in self.history],
        }


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every sample exactly once over all processes."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Any:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def finetune(
    model: nn.Module,
    train_data: Dataset[Any],
    val_data: Dataset[Any],
    *,
    new_modules: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    run_info: Mapping[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    context: DistContext | None = None,
    **settings: Any,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``train_data``, keep the best epoch by top-1 on ``val_data``.

    Datasets are map-style and yield ``(image tensor, class index)`` (an
    :class:`~ulsam_inject.train.data.ImageFolderData` may also yield a ``Skipped`` marker
    for an unreadable file: skipped and counted). ``model`` is not changed; the result holds
    a trained copy on the CPU, in eval mode, with the best epoch's weights.

    ``settings`` are :class:`FinetuneSettings` fields: ``epochs``, ``warmup_epochs`` (only
    ``new_modules`` train: by default every ULSAM block, plus the head with
    ``warmup_head=True``), ``lr`` (warm-up rate), ``finetune_lr`` (rate of the
    all-parameters phase, default ``lr / 10``, cosine-decayed), ``optimizer`` ("adamw" or
    "sgd"), ``weight_decay`` (not on biases and norms), ``label_smoothing``, ``batch_size``
    (the global batch, split evenly across processes), ``workers``, ``device``,
    ``freeze_bn``, ``sync_bn``, ``seed``, ``amp`` (bf16 autocast; default on CUDA where
    supported), ``channels_last`` (default on CUDA).

    ``checkpoint``: after each epoch, the full training state is written there (atomically,
    by rank 0); ``resume`` continues from such a file, which must come from the same run
    (same settings, model, data and ``run_info``), else :class:`ResumeError`.
    ``on_epoch`` is called (on every process) after each epoch's checkpoint is written.
    """
    try:
        config = FinetuneSettings(**settings)
    except TypeError as error:
        raise UlsamUsageError(f"finetune: {error}") from None
    context = context or init_from_env(config.device)
    device = context.device
    if config.batch_size % context.world_size:
        raise UlsamUsageError(
            f"batch size {config.batch_size} is the global batch and must divide evenly "
            f"across {context.world_size} processes"
        )
    per_rank = config.batch_size // context.world_size
    amp = (
        config.amp
        if config.amp is not None
        else device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    channels_last = config.channels_last if config.channels_last is not None else (
        device.type == "cuda"
    )  # fmt: skip
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    work = copy.deepcopy(model).to(device)
    blocks = tuple(new_modules) if new_modules is not None else tuple(find_new_modules(work))
    head = find_head(work)
    if config.warmup_epochs > 0 and not blocks and not config.warmup_head:
        raise UlsamUsageError(
            "the warm-up trains the new ULSAM blocks, and the model has none: set "
            "warmup_epochs=0 (--warmup-epochs 0) or train the head in it (--warmup-head)"
        )
    num_classes = _check_classes(work, train_data, val_data)
    if config.sync_bn and context.distributed:
        work = convert_sync_bn(work, device)
    if channels_last:
        work = work.to(memory_format=torch.channels_last)

    train_size, val_size = _size(train_data), _size(val_data)
    train_sampler: DistributedSampler[Any] = DistributedSampler(
        train_data,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    steps = len(train_sampler) // per_rank
    if steps == 0:
        raise DataError(
            f"the training set has {train_size} images, fewer than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    seeded_train = SeededSamples(train_data, config.seed)
    seeded_val = SeededSamples(val_data, config.seed)
    val_sampler = ShardSampler(val_size, context.rank, context.world_size)

    def loader(data: Dataset[Any], sampler: Sampler[tuple[int, int]], train: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=per_rank,
            sampler=sampler,
            num_workers=config.workers,
            collate_fn=collate,
            drop_last=train,
            pin_memory=device.type == "cuda",
        )

    optimizer = make_optimizer(work, config.optimizer, config.lr, config.weight_decay)
    scheduler = make_scheduler(
        optimizer,
        warmup_steps=config.warmup_epochs * steps,
        total_steps=config.epochs * steps,
        finetune_ratio=config.main_lr / config.lr,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    fingerprint = _fingerprint(
        config,
        work,
        context,
        train_size,
        val_size,
        num_classes,
        run_info,
    )

    history: list[EpochRecord] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    start = 0
    if resume is not None:
        state = read_state(resume, fingerprint)
        work.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng(state["rng"], device)
        start = int(state["epoch"])
        best_epoch = int(state["best_epoch"])
        best_state = dict(state["best_model"])
        history = [EpochRecord(**item) for item in json.loads(state["history"])]

    ddp: nn.Module | None = None
    ddp_phase = None
    for epoch in range(start, config.epochs):
        phase = phase_of(epoch, config.warmup_epochs)
        set_phase(
            work,
            phase,
            new_modules=blocks,
            head=head,
            warmup_head=config.warmup_head,
            freeze_bn=config.freeze_bn,
        )
        runner: nn.Module = work
        if context.distributed:
            if ddp is None or ddp_phase != phase:
                from torch.nn.parallel import DistributedDataParallel

                # Rebuilt when the trainable set changes: DDP takes it at construction.
                ddp = DistributedDataParallel(
                    work, device_ids=[device] if device.type == "cuda" else None
                )
                ddp_phase = phase
            runner = ddp
        train_sampler.set_epoch(epoch)
        trained = train_pass(
            runner,
            loader(seeded_train, EpochKeys(train_sampler, epoch), True),
            steps=steps,
            epoch=epoch,
            criterion=criterion,
            optimizer=optimizer,
            scheduler=scheduler,
            device=device,
            num_classes=num_classes,
            amp=amp,
            channels_last=channels_last,
            on_step=on_step,
        ).reduce(context)
        validated = evaluate_pass(
            work,
            loader(seeded_val, EpochKeys(val_sampler, 0), False),
            device=device,
            num_classes=num_classes,
            amp=amp,
            channels_last=channels_last,
        ).reduce(context)
        improved = best_state is None or validated.top1 > history[best_epoch - 1].val_top1
        record = _record(epoch, phase, trained, validated, improved)
        history.append(record)
        if improved:
            best_epoch = epoch + 1
            best_state = _cpu_state(work)
        if checkpoint is not None and context.is_main:
            write_state(
                checkpoint,
                fingerprint=fingerprint,
                epoch=epoch + 1,
                model=work,
                optimizer=optimizer,
                scheduler=scheduler,
                best_epoch=best_epoch,
                best_state=best_state,
                history=history,
            )
        if context.distributed:
            import torch.distributed as dist

            dist.barrier()
        if on_epoch is not None:
            on_epoch(record)

    assert best_state is not None
    result_model = copy.deepcopy(model).cpu()
    result_model.load_state_dict(best_state)
    result_model.eval()
    return FinetuneResult(
        model=result_model,
        best_epoch=best_epoch,
        history=tuple(history),
        settings=config,
        num_classes=num_classes,
        new_modules=blocks,
        head=head,
        world_size=context.world_size,
        resumed_at_epoch=start if resume is not None else None,
    )


def _check_classes(model: nn.Module, train_data: Dataset[Any], val_data: Dataset[Any]) -> int:
    """The model's class count; datasets that name their classes must have as many."""
    outputs = num_outputs(model, sample_shape(val_data))
    for name, data in (("training", train_data), ("validation", val_data)):
        classes = getattr(data, "classes", None)
        if classes is not None and len(classes) != outputs:
            raise DataError(
                f"the {name} data has {len(classes)} classes and the model's head "
                f"{outputs}; pass --num-classes {len(classes)} to replace the head"
            )
    return outputs


def _size(data: Dataset[Any]) -> int:
    if not isinstance(data, Sized):
        raise UlsamUsageError(f"a data set must be map-style with a length, got {type(data)}")
    return len(data)


def _record(
    epoch: int,
    phase: str,
    trained: Tally,
    validated: Tally,
    best: bool,
) -> EpochRecord:
    return EpochRecord(
        epoch=epoch + 1,
        phase=phase,
        lr=trained.lr,
        train_loss=trained.loss,
        train_top1=trained.top1,
        train_images_per_s=trained.images_per_s,
        val_loss=validated.loss,
        val_top1=validated.top1,
        val_top5=validated.top5,
        val_images_per_s=validated.images_per_s,
        skipped=trained.skipped + validated.skipped,
        best=best,
    )


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --- checkpoints of the training state -----------------------------------------------------


def _fingerprint(
    config: FinetuneSettings,
    model: nn.Module,
    context: DistContext,
    train_size: int,
    val_size: int,
    num_classes: int,
    run_info: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """What identifies a run: a checkpoint resumes only the run with the same fingerprint."""
    settings = config.to_dict()
    settings.pop("workers")  # how fast data is read changes nothing
    return {
        "settings": settings,
        "world_size": context.world_size,
        "train_images": train_size,
        "val_images": val_size,
        "num_classes": num_classes,
        "parameters": [[name, list(p.shape)] for name, p in model.named_parameters()],
        "run": json.loads(json.dumps(dict(run_info or {}), default=str)),
    }


def write_state(
    path: str | Path,
    *,
    fingerprint: Mapping[str, Any],
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    best_epoch: int,
    best_state: Mapping[str, torch.Tensor] | None,
    history: Sequence[EpochRecord],
) -> Path:
    """The whole training state after ``epoch`` epochs, written atomically (replacing the last)."""
    payload = {
        "format": STATE_FORMAT,
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
        "epoch": epoch,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _get_rng(),
        "best_epoch": best_epoch,
        "best_model": dict(best_state or {}),
        "history": json.dumps([record.to_dict() for record in history]),
    }

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)

    return atomic_write(Path(path), write, force=True)


def is_state_file(path: str | Path) -> bool:
    try:
        read_state(path, None)
    except ResumeError:
        return False
    return True


def read_state(path: str | Path, fingerprint: Mapping[str, Any] | None) -> dict[str, Any]:
    """A checkpoint written by :func:`write_state`; with ``fingerprint``, of this very run."""
    target = Path(path)
    if not target.is_file():
        raise ResumeError(f"--resume {target}: no such file")
    try:
        with target.open("rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ResumeError(
            f"--resume {target}: not a fine-tuning checkpoint (unreadable: {type(error).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(
            f"--resume {target}: not a fine-tuning checkpoint of ulsam-inject (it is written "
            f"next to --out as OUT.resume.pt while a run goes on)"
        )
    if fingerprint is not None:
        theirs = json.loads(state["fingerprint"])
        ours = json.loads(json.dumps(fingerprint, sort_keys=True))
        if theirs != ours:
            raise ResumeError(
                f"--resume {target} is from another run: {_first_difference(theirs, ours)}; "
                f"resume with the command line that started it"
            )
    return state


def _first_difference(theirs: Any, ours: Any, where: str = "") -> str:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in sorted(set(theirs) | set(ours)):
            if theirs.get(key) != ours.get(key):
                return _first_difference(theirs.get(key), ours.get(key), f"{where}{key}.")
    where = where.rstrip(".") or "settings"
    text_theirs, text_ours = json.dumps(theirs), json.dumps(ours)
    if len(text_theirs) > 60 or len(text_ours) > 60:
        return f"its {where} differ"
    return f"its {where} is {text_theirs}, this run's is {text_ours}"


def _get_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(list(state["cuda"]))
