"""Tracing and stage discovery as the library uses them: its own blocks kept opaque.

:mod:`ulsam_inject.graph` never imports the block: it takes the module types to keep as one
call as an argument. These are the public :func:`trace_model` and :func:`find_stages`, with
the library's blocks (:data:`~ulsam_inject.cost.count.BLOCK_TYPES`) passed down, so that a
model holding ULSAM blocks is traced and split into stages around them.
"""

from __future__ import annotations

from torch import nn

from ulsam_inject.cost.count import BLOCK_TYPES
from ulsam_inject.graph import stages as graph_stages
from ulsam_inject.graph import trace as graph_trace
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import Traced
from ulsam_inject.guards import check_model

__all__ = ["find_stages", "trace_model"]


def trace_model(
    model: nn.Module,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    propagate: bool = True,
) -> Traced:
    """:func:`ulsam_inject.graph.trace.trace_model` with ULSAM blocks kept as one call each.

    Example:
        >>> import torch
        >>> from ulsam_inject import ULSAM
        >>> traced = trace_model(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ULSAM(8, 2)))
        >>> [n.op for n in traced.graph_module.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    check_model(model, function="trace_model")
    return graph_trace.trace_model(model, input_size, propagate=propagate, leaf_types=BLOCK_TYPES)


def find_stages(
    model: nn.Module | Traced, input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
) -> list[Stage]:
    """:func:`ulsam_inject.graph.stages.find_stages`, ULSAM blocks never part of a stage.

    Example:
        >>> import torchvision
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> [s.name for s in stages][:3], len(stages)
        (['features.1', 'features.2', 'features.3'], 17)
    """
    if not isinstance(model, Traced):
        check_model(model, function="find_stages", accepted="an nn.Module or a Traced")
    return graph_stages.find_stages(
        model, input_size, leaf_types=BLOCK_TYPES, block_types=BLOCK_TYPES
    )
