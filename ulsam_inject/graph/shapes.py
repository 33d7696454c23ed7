"""Shapes without real compute: every node of a traced graph annotated with its output.

:func:`propagate_shapes` annotates every node with ``node.meta["value"]``: the node's
output with each tensor replaced by a tensor on the ``meta`` device (shape and dtype, no
data). It runs the graph on meta tensors (no arithmetic at all), falling back to fake
tensors and then to a real forward pass for code that needs values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from ulsam_inject.errors import InputSizeError, ShapeError, describe
from ulsam_inject.graph.modes import eval_mode

DEFAULT_INPUT_SIZE: tuple[int, int, int] = (3, 224, 224)
"""(channels, height, width) used wherever no input size is given: ImageNet's."""


def check_input_size(input_size: tuple[int, ...]) -> None:
    """Raise :class:`InputSizeError` unless ``input_size`` is (channels, height, width) > 0."""
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise InputSizeError(
            f"input size must be (channels, height, width) of positive integers, "
            f"got {input_size!r}; e.g. {DEFAULT_INPUT_SIZE}"
        )


def _to_meta(value: Any) -> Any:
    def convert(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.empty(v.shape, dtype=v.dtype, device="meta")
        return v

    return tree_map(convert, value)


class ShapeRecorder(fx.Interpreter):
    """Runs the graph and stores each node's output, as meta tensors, in ``node.meta``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["value"] = _to_meta(result)
        return result


def propagate_shapes(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> str:
    """Annotate each node with ``meta["value"]``; returns the method that worked.

    Methods, cheapest first: "meta" (parameters and input swapped for meta tensors: shapes
    only, no arithmetic), "fake" (fake tensors), "real" (a real forward on a random input
    in eval mode, no grad). Batch size 1.
    """
    errors = []
    with eval_mode(graph_module), torch.no_grad():
        for method in ("meta", "fake", "real"):
            try:
                _RUNNERS[method](graph_module, input_size)
                return method
            except Exception as error:
                errors.append(f"{method}: {describe(error, limit=280, sentence=False)}")
    message = (
        f"could not run the traced model on a 1x{'x'.join(map(str, input_size))} input "
        f"({errors[-1]})"
    )
    # Where the input size is the likely cause, it is the user's input: say so.
    first_conv = next(
        (
            m
            for n in graph_module.graph.nodes
            if n.op == "call_module"
            and isinstance(m := graph_module.get_submodule(str(n.target)), nn.Conv2d)
        ),
        None,
    )
    if first_conv is not None and first_conv.in_channels != input_size[0]:
        raise InputSizeError(
            f"{message}; the model's first convolution takes {first_conv.in_channels} "
            f"channels, the input size gives {input_size[0]}"
        )
    usual = (input_size[0], DEFAULT_INPUT_SIZE[1], DEFAULT_INPUT_SIZE[2])
    if min(input_size[1:]) < min(usual[1:]) and _runs_at(graph_module, usual):
        raise InputSizeError(
            f"{message}; it runs at {usual[1]}x{usual[2]}: is {input_size[1]}x{input_size[2]} "
            f"too small?"
        )
    raise ShapeError(message)


def _runs_at(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> bool:
    """Whether the graph runs at another input size (leaving no recorded shapes behind)."""
    try:
        with eval_mode(graph_module), torch.no_grad():
            for method in ("meta", "fake", "real"):
                try:
                    _RUNNERS[method](graph_module, input_size)
                    return True
                except Exception:
                    continue
        return False
    finally:
        for node in graph_module.graph.nodes:
            node.meta.pop("value", None)


def _example_input(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> torch.Tensor:
    dtype = next((p.dtype for p in graph_module.parameters() if p.is_floating_point()), None)
    return torch.randn(1, *input_size, dtype=dtype or torch.float32)


def _run_meta(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> None:
    state = {
        name: torch.empty_like(t, device="meta")
        for name, t in graph_module.state_dict(keep_vars=True).items()
    }
    state.update(
        (name, torch.empty_like(t, device="meta"))
        for name, t in graph_module.named_buffers()
        if name not in state
    )
    example = _example_input(graph_module, input_size).to("meta")
    with torch.nn.utils.stateless._reparametrize_module(graph_module, state):
        ShapeRecorder(graph_module).run(example)


def _run_fake(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    example = mode.from_tensor(_example_input(graph_module, input_size))
    with mode:
        ShapeRecorder(graph_module).run(example)


def _run_real(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> None:
    ShapeRecorder(graph_module).run(_example_input(graph_module, input_size))


_RUNNERS: dict[str, Callable[[fx.GraphModule, tuple[int, int, int]], None]] = {
    "meta": _run_meta,
    "fake": _run_fake,
    "real": _run_real,
}


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape of ``node`` if it is a single tensor, else None."""
    value = node.meta.get("value")
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None
