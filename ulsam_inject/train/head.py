"""The classifier head: find it, count the model's classes, replace it for a new class count."""

from __future__ import annotations

import torch
from torch import nn

from ulsam_inject.errors import DataError, UlsamUsageError

__all__ = ["find_head", "num_outputs", "replace_head"]


def find_head(model: nn.Module) -> str | None:
    """The classifier's dotted name: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except Exception:
            classifier = None
        for name, module in model.named_modules():
            if classifier is not None and module is classifier and name:
                return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def num_outputs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """How many class scores ``model`` returns, from one forward pass on zeros (eval mode)."""
    flags = [(m, m.training) for m in model.modules()]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(1, *input_size, device=device))
    finally:
        for module, flag in flags:
            module.training = flag
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UlsamUsageError(
            f"the model returns {shape}, expected class scores of shape (batch, classes)"
        )
    return int(out.shape[1])


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Give ``model`` a fresh head for ``num_classes`` classes (in place); returns a description.

    timm models with ``reset_classifier`` use it; otherwise the last ``nn.Linear`` is
    replaced by a new one with the same input features (and bias or not).
    """
    if num_classes < 1:
        raise DataError(f"--num-classes must be a positive integer, got {num_classes}")
    reset = getattr(model, "reset_classifier", None)
    if callable(reset) and not isinstance(model, torch.fx.GraphModule):
        reset(num_classes)
        return f"reset the timm classifier to {num_classes} classes"
    name = find_head(model)
    if name is None:
        raise UlsamUsageError(
            "--num-classes needs a classifier to replace, and the model has no nn.Linear"
        )
    old = model.get_submodule(name)
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    model.set_submodule(name, new)
    return f"replaced the head {name} ({old.out_features} -> {num_classes} classes)"
