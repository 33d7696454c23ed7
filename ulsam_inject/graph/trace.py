"""torch.fx tracing with automatic leaf fallback, in train and eval mode.

``trace_model`` symbolically traces a model. When a submodule's code cannot be traced
(data-dependent control flow, ``math`` on shapes, ...), the innermost module whose forward
raised is made a leaf and tracing is retried, so that everything outside it can still be
rewritten. Every node records the module paths that enclose it in ``node.meta["scope"]``.
The model is traced in both modes so that one graph is right in both
(:mod:`ulsam_inject.graph.modes`); its structure survives pickling
(:mod:`ulsam_inject.graph.pickling`); shapes are recorded on every node
(:mod:`ulsam_inject.graph.shapes`).

This layer knows no block type: the module types to keep as one opaque call (the library's
own blocks) are the ``leaf_types`` argument, given by the layers above.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ulsam_inject.errors import TraceError, describe
from ulsam_inject.graph.modes import (
    TrainingFlag,
    call_training_flag,
    mode_dependent_module,
    read_training_flag,
    training_mode,
)
from ulsam_inject.graph.pickling import record_structure, recorded_leaves, restore_node_structure
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, check_input_size, propagate_shapes

LeafTypes = Sequence[type[nn.Module]]
"""Module types a tracer keeps as one call (the library's blocks), besides ``nn.Conv2d``."""

MAX_LEAF_RETRIES = 400
BLOCKS = "ulsam"
"""The root submodule of a retrofitted model that holds its blocks: keys ``ulsam.<stage>.*``."""


@dataclass(frozen=True)
class Traced:
    """A traced model: the graph module, the submodules made leaves, the input size used.

    ``leaves`` maps the dotted path of each submodule that could not be traced to the
    reason (the error its code raised under symbolic tracing).
    """

    graph_module: fx.GraphModule
    input_size: tuple[int, int, int]
    leaves: dict[str, str] = field(default_factory=dict)
    shape_method: str = "meta"
    root: nn.Module | None = field(default=None, repr=False, compare=False)
    """The module that was traced: its submodules keep their classes (Sequential, ...)."""

    def leaf_containing(self, path: str) -> str | None:
        """The leaf that holds the module ``path`` (or is it), if any."""
        for leaf in self.leaves:
            if path == leaf or path.startswith(leaf + "."):
                return leaf
        return None


class ScopeTracer(fx.Tracer):
    """A tracer that records enclosing module paths and which module's code failed.

    ``leaves`` are module paths and ``leaf_types`` module types to keep as one call.
    """

    def __init__(self, leaves: set[str] | None = None, leaf_types: LeafTypes = ()) -> None:
        super().__init__(autowrap_modules=(math,))
        self.extra_leaves = leaves or set()
        self.leaf_types = (nn.Conv2d, TrainingFlag, *leaf_types)
        self.path_stack: list[str] = []
        self.failed_path: str | None = None
        self.failure: str = ""
        self._names: dict[int, tuple[str, torch.Tensor]] = {}
        self._names_root: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Conv2d subclasses (timm's Conv2dSame, StdConv2d, a user's own) stay one call, like
        # nn.Conv2d itself: stage discovery finds depthwise/pointwise convs as modules.
        if isinstance(m, self.leaf_types) or module_qualified_name in self.extra_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        path = self.path_of_module(m)
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            # The innermost non-leaf module sees the error first: that is the one to leaf.
            if self.failed_path is None and not self.is_leaf_module(m, path):
                self.failed_path = path
                self.failure = describe(error, limit=280, sentence=False)
            raise
        finally:
            self.path_stack.pop()

    def create_arg(self, a: Any) -> Any:
        # fx looks a parameter or buffer up by scanning every named parameter (buffer) of
        # the root, once per use: quadratic on timm models whose norms call F.batch_norm
        # with their own tensors. Look it up in a table instead, built once per root.
        if isinstance(a, torch.Tensor):
            entry = self._tensor_names().get(id(a))
            if entry is not None and entry[1] is a:
                return self.create_node("get_attr", entry[0], (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        # The same scan, for a parameter read as an attribute in traced code.
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            entry = self._tensor_names().get(id(attr_val))
            if entry is not None and entry[1] is attr_val:
                name = entry[0]
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _tensor_names(self) -> dict[int, tuple[str, torch.Tensor]]:
        if self._names_root is not self.root:
            names: dict[int, tuple[str, torch.Tensor]] = {}
            for name, buffer in self.root.named_buffers():
                names.setdefault(id(buffer), (name, buffer))
            for name, parameter in self.root.named_parameters():
                names.setdefault(id(parameter), (name, parameter))
            self._names, self._names_root = names, self.root
        return self._names

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        scope = list(self.path_stack)
        if node.op == "call_module":
            # A GraphModule calls its leaves directly: recover the enclosing paths from
            # the target itself, so a flattened (e.g. retrofitted) model keeps its scopes.
            parts = str(node.target).split(".")
            prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
            scope = [p for p in scope if p not in prefixes] + prefixes
        node.meta["scope"] = tuple(scope)
        restore_node_structure(self.root, node)
        return node


def trace_model(
    model: nn.Module,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    propagate: bool = True,
    leaf_types: LeafTypes = (),
) -> Traced:
    """Trace ``model`` with torch.fx, making untraceable submodules leaves, and propagate shapes.

    Symbolic tracing bakes ``if self.training`` branches into the graph, so the model is
    traced in train and in eval mode: submodules whose code differs between the two become
    leaves (they then run their own code, reading their own flag), and ``training=``
    arguments that differ become a read of the graph module's ``training`` flag. The one
    graph is then right in both modes.

    Submodules of the ``leaf_types`` stay one call each, as ``nn.Conv2d`` does.

    The model is not modified (train/eval flags are restored). The graph module shares
    submodules with ``model``; deep-copy first to rewrite safely.

    Example:
        >>> import torchvision
        >>> traced = trace_model(torchvision.models.mobilenet_v2())
        >>> traced.leaves
        {}
    """
    check_input_size(input_size)
    size = (input_size[0], input_size[1], input_size[2])
    recorded = recorded_leaves(model)
    if recorded is not None:
        # Made by trace_model (a retrofitted model, say): its graph records the scope of
        # every node, which tracing its flattened code again would lose for all but the
        # module calls. Use a copy of that graph.
        assert isinstance(model, fx.GraphModule)
        graph = copy.deepcopy(model.graph)
        graph_module = fx.GraphModule(model, graph, type(model).__name__)
        return _finish(model, graph_module, size, recorded, propagate)
    leaves: dict[str, str] = {}
    for _ in range(MAX_LEAF_RETRIES):
        eval_graph, tracer = _trace_in_mode(model, leaves, leaf_types, training=False)
        train_graph, _ = _trace_in_mode(model, leaves, leaf_types, training=True)
        differing = mode_dependent_module(train_graph, eval_graph)
        if differing is not None:
            leaves[differing] = "its code depends on self.training"
            continue
        read_training_flag(train_graph, eval_graph)
        graph_module = fx.GraphModule(tracer.root, eval_graph, type(model).__name__)
        return _finish(model, graph_module, size, leaves, propagate)
    raise TraceError(f"gave up tracing after making {MAX_LEAF_RETRIES} submodules leaves")


def _finish(
    model: nn.Module,
    graph_module: fx.GraphModule,
    size: tuple[int, int, int],
    leaves: dict[str, str],
    propagate: bool,
) -> Traced:
    _copy_unreferenced_state(model, graph_module)
    call_training_flag(graph_module)
    # Only the root's flag: the submodules are the model's own, with their own flags.
    graph_module.training = model.training
    record_structure(graph_module, leaves)
    method = propagate_shapes(graph_module, size) if propagate else "none"
    return Traced(graph_module, size, leaves, method, root=model)


def _trace_in_mode(
    model: nn.Module, leaves: dict[str, str], leaf_types: LeafTypes, *, training: bool
) -> tuple[fx.Graph, ScopeTracer]:
    """Trace once in the given mode, adding untraceable submodules to ``leaves`` as needed."""
    # Traced code runs for real on tensors that are not proxies: a buffer read as an
    # attribute and updated in place (timm's BatchNormAct2d counts batches in train mode)
    # would change the user's model. Put every buffer's value back afterwards.
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        with training_mode(model, training):
            return _trace_with_leaves(model, leaves, leaf_types)
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)


def _trace_with_leaves(
    model: nn.Module, leaves: dict[str, str], leaf_types: LeafTypes
) -> tuple[fx.Graph, ScopeTracer]:
    """Trace, making each submodule whose code fails a leaf (added to ``leaves``)."""
    for _ in range(MAX_LEAF_RETRIES):
        tracer = ScopeTracer(set(leaves), leaf_types)
        try:
            return tracer.trace(model), tracer
        except Exception as error:
            if tracer.failed_path is None or tracer.failed_path in leaves:
                raise TraceError(
                    f"cannot trace {type(model).__name__} with torch.fx: its own forward "
                    f"failed ({describe(error, limit=280, sentence=False)}); only "
                    f"submodules can be made leaves"
                ) from error
            leaves[tracer.failed_path] = tracer.failure
    raise TraceError(f"gave up tracing after making {MAX_LEAF_RETRIES} submodules leaves")


def _copy_unreferenced_state(model: nn.Module, graph_module: fx.GraphModule) -> None:
    """Keep modules the forward never touches, so state-dict keys match the original's."""
    present = set(graph_module.state_dict(keep_vars=True))
    for path, module in model.named_modules():
        missing = [k for k in _own_state_names(module) if f"{path}.{k}" not in present]
        if not path or not missing:
            continue
        if not _has_attr_path(graph_module, path):
            graph_module.add_submodule(path, module)
            present.update(f"{path}.{k}" for k in module.state_dict(keep_vars=True))
            continue
        # The path exists, built by fx from the tensors the graph reads: add the tensors
        # it never reads (e.g. a BatchNorm's num_batches_tracked in a traced-through norm).
        target = graph_module.get_submodule(path)
        for name in missing:
            value = getattr(module, name)
            if isinstance(value, nn.Parameter):
                target.register_parameter(name, value)
            else:
                target.register_buffer(name, value)
            present.add(f"{path}.{name}")


def _own_state_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)] + [
        n
        for n, _ in module.named_buffers(recurse=False)
        if n not in module._non_persistent_buffers_set
    ]


def _has_attr_path(root: nn.Module, path: str) -> bool:
    obj: Any = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
