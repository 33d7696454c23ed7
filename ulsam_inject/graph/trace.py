"""torch.fx tracing with automatic leaf fallback, and shape propagation without real compute.

``trace_model`` symbolically traces a model. When a submodule's code cannot be traced
(data-dependent control flow, ``math`` on shapes, ...), the innermost module whose forward
raised is made a leaf and tracing is retried, so that everything outside it can still be
rewritten. Every node records the module paths that enclose it in ``node.meta["scope"]``.

``propagate_shapes`` annotates every node with ``node.meta["value"]``: the node's output
with each tensor replaced by a tensor on the ``meta`` device (shape and dtype, no data).
It runs the graph on meta tensors (no arithmetic at all), falling back to fake tensors and
then to a real forward pass for code that needs values.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from ulsam_inject.block.module import ULSAM
from ulsam_inject.errors import InputSizeError, ShapeError, TraceError, describe

MAX_LEAF_RETRIES = 400
STRUCTURE = "_ulsam_inject_structure"
"""Where a traced (or retrofitted) GraphModule keeps its structure: the untraceable leaves
(in the output node's ``meta``) and each node's scope (``node.meta["scope"]``).

``copy.deepcopy`` keeps ``node.meta``. Pickling does not: a GraphModule is pickled as code
and traced again when loaded. So the structure is also kept in a plain attribute of this
name, which is pickled (and kept by deepcopy), and tracing the code again restores
``node.meta`` from it.
"""
BLOCKS = "ulsam"
"""The root submodule of a retrofitted model that holds its blocks: keys ``ulsam.<stage>.*``."""
TRAINING_FLAG = "ulsam_training_flag"
"""The root submodule (a :class:`TrainingFlag`) that reads the model's train/eval mode."""


class TrainingFlag(nn.Module):
    """Returns its own ``training`` flag, which ``model.train()`` / ``.eval()`` set.

    A graph reads the mode through a call to this module rather than through an attribute:
    a call survives tracing the generated code again (as unpickling does), where an
    attribute read would be frozen to the value it had then.
    """

    def forward(self) -> bool:
        return self.training


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
    """A tracer that records enclosing module paths and which module's code failed."""

    def __init__(self, leaves: set[str] | None = None) -> None:
        super().__init__(autowrap_modules=(math,))
        self.extra_leaves = leaves or set()
        self.path_stack: list[str] = []
        self.failed_path: str | None = None
        self.failure: str = ""
        self._names: dict[int, tuple[str, torch.Tensor]] = {}
        self._names_root: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Conv2d subclasses (timm's Conv2dSame, StdConv2d, a user's own) stay one call, like
        # nn.Conv2d itself: stage discovery finds depthwise/pointwise convs as modules.
        if (
            isinstance(m, (ULSAM, nn.Conv2d, TrainingFlag))
            or module_qualified_name in self.extra_leaves
        ):
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
        recorded = self.root.__dict__.get(STRUCTURE)
        if isinstance(recorded, dict) and node.name in recorded["scopes"]:
            # Tracing the code of a GraphModule made here (unpickling does): restore what
            # its code cannot say, the scopes of the nodes inside modules and the leaves.
            node.meta["scope"] = tuple(recorded["scopes"][node.name])
            if node.op == "output":
                node.meta[STRUCTURE] = dict(recorded["leaves"])
        return node


def trace_model(
    model: nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    propagate: bool = True,
) -> Traced:
    """Trace ``model`` with torch.fx, making untraceable submodules leaves, and propagate shapes.

    Symbolic tracing bakes ``if self.training`` branches into the graph, so the model is
    traced in train and in eval mode: submodules whose code differs between the two become
    leaves (they then run their own code, reading their own flag), and ``training=``
    arguments that differ become a read of the graph module's ``training`` flag. The one
    graph is then right in both modes.

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
    recorded = _recorded_leaves(model)
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
        eval_graph, tracer = _trace_in_mode(model, leaves, training=False)
        train_graph, _ = _trace_in_mode(model, leaves, training=True)
        differing = _mode_dependent_module(train_graph, eval_graph)
        if differing is not None:
            leaves[differing] = "its code depends on self.training"
            continue
        _read_training_flag(train_graph, eval_graph)
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
    _call_training_flag(graph_module)
    # Only the root's flag: the submodules are the model's own, with their own flags.
    graph_module.training = model.training
    record_structure(graph_module, leaves)
    method = propagate_shapes(graph_module, size) if propagate else "none"
    return Traced(graph_module, size, leaves, method, root=model)


def record_structure(graph_module: fx.GraphModule, leaves: dict[str, str]) -> None:
    """Mark ``graph_module`` as traced here, with ``leaves``; keep its scopes for pickling."""
    graph_module.graph.output_node().meta[STRUCTURE] = dict(leaves)
    scopes = {node.name: tuple(node.meta.get("scope", ())) for node in graph_module.graph.nodes}
    record = {"leaves": dict(leaves), "scopes": scopes}
    setattr(graph_module, STRUCTURE, record)
    # copy.deepcopy drops attributes the graph does not use, but sets again those listed
    # under this meta key (where this torch has it).
    key = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", None)
    if key is not None:
        graph_module.meta.setdefault(key, {})[STRUCTURE] = record


def _recorded_leaves(model: nn.Module) -> dict[str, str] | None:
    """The leaves of a GraphModule made by :func:`trace_model`; None for any other module."""
    if not isinstance(model, fx.GraphModule):
        return None
    outputs = [node for node in model.graph.nodes if node.op == "output"]
    leaves = outputs[0].meta.get(STRUCTURE) if outputs else None
    return dict(leaves) if isinstance(leaves, dict) else None


def _call_training_flag(graph_module: fx.GraphModule) -> None:
    """Turn the graph's read of ``self.training`` into a call of a :class:`TrainingFlag`."""
    reads = [n for n in graph_module.graph.nodes if n.op == "get_attr" and n.target == "training"]
    if not reads:
        return
    graph_module.add_submodule(TRAINING_FLAG, TrainingFlag())
    graph = graph_module.graph
    for read in reads:
        # A new node, named after its target as tracing the code again would name it.
        with graph.inserting_before(read):
            call = graph.call_module(TRAINING_FLAG)
        call.meta["scope"] = ()
        read.replace_all_uses_with(call)
        graph.erase_node(read)
    graph_module.recompile()


def _trace_in_mode(
    model: nn.Module, leaves: dict[str, str], *, training: bool
) -> tuple[fx.Graph, ScopeTracer]:
    """Trace once in the given mode, adding untraceable submodules to ``leaves`` as needed."""
    flags = [(m, m.training) for m in model.modules()]
    # Traced code runs for real on tensors that are not proxies: a buffer read as an
    # attribute and updated in place (timm's BatchNormAct2d counts batches in train mode)
    # would change the user's model. Put every buffer's value back afterwards.
    buffers = [(b, b.clone()) for b in model.buffers()]
    model.train(training)
    try:
        for _ in range(MAX_LEAF_RETRIES):
            tracer = ScopeTracer(set(leaves))
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
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for buffer, value in buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
    raise TraceError(f"gave up tracing after making {MAX_LEAF_RETRIES} submodules leaves")


def _signature(node: fx.Node) -> tuple[Any, ...]:
    return (node.op, str(node.target), node.meta.get("scope", ()))


def _mode_dependent_module(train: fx.Graph, eval_: fx.Graph) -> str | None:
    """The innermost submodule whose traced code differs between train and eval mode."""
    # Both graphs end with their output node: graphs of different lengths differ at the
    # shorter one's output node at the latest, so comparing pairs finds every difference.
    for a, b in zip(train.nodes, eval_.nodes):
        if _signature(a) != _signature(b):
            return _deciding_module(a) or _deciding_module(b)
    return None


def _deciding_module(node: fx.Node) -> str | None:
    """The innermost traced (non-leaf) module around ``node``: the code that chose it."""
    scope = list(node.meta.get("scope", ()))
    if node.op == "call_module" and scope and scope[-1] == node.target:
        scope.pop()
    return scope[-1] if scope else None


def _read_training_flag(train: fx.Graph, eval_: fx.Graph) -> None:
    """Where the two traces differ only in a True/False argument, read ``self.training``."""
    flag: fx.Node | None = None
    for a, b in zip(train.nodes, eval_.nodes):
        if a.op != "call_function":
            continue
        new_args = list(b.args)
        new_kwargs = dict(b.kwargs)
        changed = False
        for i, (x, y) in enumerate(zip(a.args, b.args)):
            if x is True and y is False:
                new_args[i], changed = None, True
        for key in b.kwargs:
            if a.kwargs.get(key) is True and b.kwargs[key] is False:
                new_kwargs[key], changed = None, True
        if not changed:
            continue
        if flag is None:
            first = next(n for n in eval_.nodes if n.op != "placeholder")
            with eval_.inserting_before(first):
                flag = eval_.get_attr("training")
            flag.meta["scope"] = ()
        b.args = tuple(
            flag if v is None and b.args[i] is False else v for i, v in enumerate(new_args)
        )
        b.kwargs = {
            k: flag if v is None and b.kwargs[k] is False else v for k, v in new_kwargs.items()
        }


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


def check_input_size(input_size: tuple[int, ...]) -> None:
    """Raise :class:`InputSizeError` unless ``input_size`` is (channels, height, width) > 0."""
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise InputSizeError(
            f"input size must be (channels, height, width) of positive integers, "
            f"got {input_size!r}; e.g. (3, 224, 224)"
        )


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
    usual = (input_size[0], 224, 224)
    if min(input_size[1:]) < 224 and _runs_at(graph_module, usual):
        raise InputSizeError(
            f"{message}; it runs at 224x224: is {input_size[1]}x{input_size[2]} too small?"
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
