"""Which layer's feature map a heat map explains: the default, or one named by the user.

The default is the deepest feature map before pooling: of the modules whose output is a
4-D map larger than 1x1, the one that finishes last in the forward pass. For a torchvision
MobileNetV2 that is ``features`` (its 1280-channel 7x7 map), for a ResNet ``layer4``; an
original model and its retrofitted copy get the same name, so their maps compare.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ulsam_inject.errors import LayerError, did_you_mean
from ulsam_inject.guards import echo

__all__ = ["default_layer", "record_maps", "resolve_layer"]


@contextmanager
def record_maps(model: nn.Module) -> Iterator[dict[str, tuple[int, ...]]]:
    """Within the block, every module's 4-D output shape, in the order the modules finish.

    The hooks are removed on leaving; the first call of a module counts.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4 and name not in shapes:
                shapes[name] = tuple(output.shape)

        return record

    for name, module in model.named_modules():
        if name:  # the model itself: its output is the logits
            handles.append(module.register_forward_hook(hook(name)))
    try:
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


def default_layer(shapes: dict[str, tuple[int, ...]], model_name: str = "the model") -> str:
    """The layer that finished last with a map larger than 1x1 (of :func:`record_maps`)."""
    spatial = [name for name, shape in shapes.items() if shape[2] * shape[3] > 1]
    if not spatial:
        raise LayerError(
            f"{model_name} has no 4-D feature map larger than 1x1 at this input size; "
            f"give --layer (layer=) or a larger input size"
        )
    return spatial[-1]


def resolve_layer(
    model: nn.Module, name: str, shapes: dict[str, tuple[int, ...]], model_name: str = "the model"
) -> nn.Module:
    """The module ``name`` of ``model``; it must output a 4-D map, else :class:`LayerError`."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        hint = did_you_mean(name, list(shapes) or list(modules))
        raise LayerError(
            f"layer {echo(name)} is not a module of {model_name}"
            + (f"; {hint}" if hint else "; see 'ulsam-inject stages' for its stages")
        )
    if name not in shapes:
        raise LayerError(
            f"layer {echo(name)} of {model_name} does not output a 4-D feature map "
            f"(batch, channels, height, width); pick a convolutional stage or block"
        )
    return modules[name]
