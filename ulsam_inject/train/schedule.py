"""The fine-tuning schedule: which parameters train when, at what rate, with what decay.

Two phases, the usual recipe for new modules in a pretrained network:

1. **warm-up** (``warmup_epochs``): only the new blocks (and the head, when asked or when
   it was replaced) train, at the constant rate ``lr``; every other parameter has
   ``requires_grad=False`` and every original BatchNorm keeps its running statistics, so
   the original network is bitwise unchanged.
2. **all**: every parameter trains, at ``finetune_lr`` (default ``lr / 10``), decayed to zero
   by a cosine over this phase's steps.

Weight decay applies to weights of two or more dimensions only: never to biases, norms
(BatchNorm, LayerNorm affine parameters) or other vectors. ``freeze_bn`` keeps the original
BatchNorms in eval mode for the whole run (the new blocks' BatchNorms still learn their
statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ulsam_inject.errors import UlsamUsageError

__all__ = [
    "OPTIMIZERS",
    "Phase",
    "find_new_modules",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "phase_of",
    "set_phase",
    "trainable",
]

Phase = Literal["warmup", "all"]
OPTIMIZERS = ("adamw", "sgd")


def find_new_modules(model: nn.Module) -> list[str]:
    """Dotted names of the ULSAM blocks in ``model``: the modules a warm-up trains."""
    from ulsam_inject.block.module import ULSAM

    return [name for name, module in model.named_modules() if isinstance(module, ULSAM)]


def _under(name: str, prefixes: Collection[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def trainable(
    name: str, phase: Phase, new_modules: Collection[str], head: str | None, warmup_head: bool
) -> bool:
    """Whether parameter ``name`` trains in ``phase``."""
    if phase == "all":
        return True
    return _under(name, new_modules) or (warmup_head and head is not None and _under(name, [head]))


def phase_of(epoch: int, warmup_epochs: int) -> Phase:
    return "warmup" if epoch < warmup_epochs else "all"


def set_phase(
    model: nn.Module,
    phase: Phase,
    *,
    new_modules: Collection[str],
    head: str | None,
    warmup_head: bool,
    freeze_bn: bool,
) -> None:
    """Train mode for ``phase``: ``requires_grad`` per parameter, original BatchNorms frozen."""
    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name, phase, new_modules, head, warmup_head))
    if phase == "warmup" or freeze_bn:
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm) and not _under(name, new_modules):
                module.eval()


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """AdamW or SGD (Nesterov momentum) over every parameter, in two groups: with and
    without weight decay (vectors: biases and norm parameters)."""
    decay = [p for _, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    raise UlsamUsageError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, finetune_ratio: float) -> float:
    """The rate at ``step`` as a fraction of ``lr``: 1 in the warm-up, then a cosine from
    ``finetune_ratio`` towards 0 over the remaining steps (never exactly 0 on a step taken)."""
    if step < warmup_steps:
        return 1.0
    main = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / main)
    return finetune_ratio * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    finetune_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following :func:`lr_factor` (its state is the step count)."""
    factor: Callable[[int], float] = lambda step: lr_factor(  # noqa: E731
        step, warmup_steps, total_steps, finetune_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
