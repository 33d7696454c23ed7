"""What a model costs: parameters, MACs, other ops and activation bytes, node by node.

:func:`count` walks the traced graph once, in execution order, and prices each node with
the rule for its op from :mod:`ulsam_inject.cost.rules` (the rule table and its conventions
are documented there). It needs shapes, not values: the node outputs recorded by
:func:`ulsam_inject.graph.shapes.propagate_shapes` are meta tensors, so no arithmetic runs, and a
384x384 RegNet-Y 128GF counts in seconds.

Units:

- **MACs**: multiply-adds of convolutions, linear layers and matrix products (einsum,
  attention included), the paper's and torchvision's convention (``meta["_ops"]`` is
  GMACs); ``flops`` = 2 x MACs.
- **other ops**: everything else that computes (elementwise arithmetic, activations,
  pooling, normalization, softmax, biases), one rule per op kind.
- **bytes**: activation traffic: every op that computes or copies reads its tensor inputs
  (parameters excluded) and writes its outputs, dtype-aware; views, dropout in eval and
  ``Identity`` move nothing. A leaf module is priced at its boundary.

Counts are for the batch the graph was run with (one image) in eval mode.

Calls that are one opaque node are opened where possible: a leaf module with no rule of
its own (a block made a leaf because its code depends on ``self.training`` or branches on
shapes) is traced on its own in eval mode, with its parameters swapped for meta tensors
(symbolically, else with concrete shapes through ``torch.fx``'s ``MetaTracer``) and
priced op by op; its bytes are those at its boundary. If that fails, or for a wrapped
function with no rule (``torch.fx.wrap``), its MACs come from
``torch.utils.flop_counter.FlopCounterMode`` run on meta tensors and its other ops are
reported as uncounted. Nothing without a rule is silently counted as zero: it is listed
in :attr:`Cost.uncounted`.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode

from ulsam_inject.block.module import ULSAM
from ulsam_inject.cost import rules as cost_rules
from ulsam_inject.cost.rules import NoRule, moves_data, nbytes, tensors
from ulsam_inject.errors import InputSizeError, UlsamUsageError
from ulsam_inject.graph.modes import eval_mode
from ulsam_inject.graph.shapes import (
    DEFAULT_INPUT_SIZE,
    ShapeRecorder,
    check_input_size,
    propagate_shapes,
)
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import MAX_LEAF_RETRIES, ScopeTracer, Traced, trace_model
from ulsam_inject.guards import check_input_limits, check_model

BLOCK_TYPES: tuple[type[nn.Module], ...] = (ULSAM,)
"""The library's blocks: traced as one call each (graph/ is told so, it never imports
block/), priced by their own rule, and never part of a stage (surgery/ passes them on)."""
MAX_OPEN_DEPTH = 4
"""How deep leaves inside opened leaves are opened in turn."""
TOTAL_KEYS = (
    "params",
    "trainable_params",
    "macs",
    "flops",
    "other_ops",
    "bytes_read",
    "bytes_written",
)
"""A whole model's totals, as :meth:`Cost.summary` gives them (and the report shows)."""


class _Derived:
    """What follows from the counted fields, defined once for every cost record."""

    macs: int
    bytes_read: int
    bytes_written: int

    @property
    def flops(self) -> int:
        """2 x MACs."""
        return 2 * self.macs

    @property
    def bytes(self) -> int:
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written


@dataclass(frozen=True)
class NodeCost(_Derived):
    """The cost of one fx node.

    ``target`` names what was called: a module class (``Conv2d``), a function
    (``torch.flatten``, ``operator.add``) or a Tensor method (``Tensor.view``); ``module``
    is the called submodule's path for ``call_module`` nodes. ``params`` are the
    parameters of that submodule (or of the parameter a ``get_attr`` node reads).
    ``scope`` is the innermost module whose code made the node (the called module itself
    for a ``call_module`` node), when the tracer recorded it. ``uncounted`` names the ops
    in this node that have no rule (their other ops are not in ``other_ops``);
    ``uncounted_macs`` those whose MACs are not in ``macs`` either.
    """

    name: str
    op: str
    target: str
    module: str | None
    macs: int
    other_ops: int
    bytes_read: int
    bytes_written: int
    params: int
    scope: str | None = None
    uncounted: tuple[str, ...] = ()
    uncounted_macs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Totals(_Derived):
    """Summed costs of some nodes (a stage) or of a whole model.

    Totals add up (``a + b``) and subtract (``after - before``, a delta).

    Example:
        >>> a = Totals(params=10, macs=100, other_ops=5, bytes_read=8, bytes_written=4)
        >>> (a + a).macs, (a - a).flops
        (200, 0)
    """

    params: int
    macs: int
    other_ops: int
    bytes_read: int
    bytes_written: int
    uncounted: tuple[str, ...] = ()

    def __add__(self, other: Totals) -> Totals:
        return self._combine(other, operator.add)

    def __sub__(self, other: Totals) -> Totals:
        return self._combine(other, operator.sub)

    def _combine(self, other: Totals, op: Callable[[int, int], int]) -> Totals:
        return Totals(
            op(self.params, other.params),
            op(self.macs, other.macs),
            op(self.other_ops, other.other_ops),
            op(self.bytes_read, other.bytes_read),
            op(self.bytes_written, other.bytes_written),
            _union(self.uncounted, other.uncounted),
        )


@dataclass(frozen=True)
class Cost(_Derived):
    """The cost of a model at one input size, in total and per fx node.

    ``params``, ``trainable_params`` and ``buffers`` (buffer elements) are counted from
    the model's tensors, each shared tensor once. ``macs``, ``other_ops``, ``bytes_read``
    and ``bytes_written`` are sums over ``per_node`` (execution order). ``uncounted``
    names, each once, the ops that have no rule; ``uncounted_macs`` those whose MACs are
    unknown too (both empty for torchvision's CNNs).

    Example:
        >>> import torchvision
        >>> cost = count(torchvision.models.mobilenet_v2())
        >>> round(cost.macs / 1e9, 3), cost.params, cost.uncounted
        (0.301, 3504872, ())
    """

    input_size: tuple[int, int, int]
    params: int
    trainable_params: int
    buffers: int
    macs: int
    other_ops: int
    bytes_read: int
    bytes_written: int
    uncounted: tuple[str, ...]
    uncounted_macs: tuple[str, ...]
    per_node: tuple[NodeCost, ...]

    def summary(self) -> dict[str, int]:
        """The whole model's :data:`TOTAL_KEYS`, by name (the report's before and after)."""
        return {key: getattr(self, key) for key in TOTAL_KEYS}

    def totals(self) -> Totals:
        """The whole model's costs as :class:`Totals` (to subtract one model from another)."""
        return Totals(
            self.params,
            self.macs,
            self.other_ops,
            self.bytes_read,
            self.bytes_written,
            self.uncounted,
        )

    def for_nodes(self, names: Iterable[str]) -> Totals:
        """Sum the costs of the nodes named (e.g. a stage's ``nodes``).

        A submodule (or parameter) used by several of the nodes counts its parameters once.

        Example:
            >>> import torchvision
            >>> from ulsam_inject.graph.stages import find_stages
            >>> from ulsam_inject.graph.trace import trace_model
            >>> traced = trace_model(torchvision.models.mobilenet_v2())
            >>> stage = find_stages(traced)[0]
            >>> count(traced).for_nodes(stage.nodes).params
            896
        """
        index = {n.name: n for n in self.per_node}
        chosen = []
        for name in dict.fromkeys(names):
            if name not in index:
                raise UlsamUsageError(
                    f"no node named {name!r} in the counted graph; node names are fx node "
                    f"names such as {', '.join(repr(n.name) for n in self.per_node[1:4])}"
                )
            chosen.append(index[name])
        return _sum(chosen)

    def for_stages(self, stages: Iterable[Stage]) -> dict[str, Totals]:
        """Each stage's costs (its nodes' sums), by stage name, in the order given.

        Example:
            >>> import torchvision
            >>> from ulsam_inject.graph.stages import find_stages
            >>> from ulsam_inject.graph.trace import trace_model
            >>> traced = trace_model(torchvision.models.mobilenet_v2())
            >>> per_stage = count(traced).for_stages(find_stages(traced))
            >>> per_stage["features.13"].macs
            22692096
        """
        return {stage.name: self.for_nodes(stage.nodes) for stage in stages}

    def for_module(self, path: str) -> Totals:
        """Sum the costs of the nodes that a submodule's code made (it and its children).

        Example:
            >>> import torch
            >>> from ulsam_inject import ULSAM
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), ULSAM(16, 4))
            >>> count(model, (3, 8, 8)).for_module("1").macs  # 2 x C x H x W
            2048
        """
        inside = [
            n
            for n in self.per_node
            if any(p == path or p.startswith(path + ".") for p in (n.module, n.scope) if p)
        ]
        if not inside:
            raise UlsamUsageError(
                f"no node was made by a module named {path!r} (or the graph records no "
                f"scopes); modules called in the graph include "
                f"{', '.join(repr(n.module) for n in self.per_node if n.module)[:200]}"
            )
        return _sum(inside)


def _sum(chosen: list[NodeCost]) -> Totals:
    """Totals of some nodes; a submodule or parameter used by several counts once."""
    owners: dict[str, int] = {}
    for node in chosen:
        if node.params:
            owners[node.module or node.target] = node.params
    return Totals(
        sum(owners.values()),
        sum(n.macs for n in chosen),
        sum(n.other_ops for n in chosen),
        sum(n.bytes_read for n in chosen),
        sum(n.bytes_written for n in chosen),
        _union(*(n.uncounted for n in chosen)),
    )


def count(model: nn.Module | Traced, input_size: tuple[int, int, int] | None = None) -> Cost:
    """Count parameters, MACs, other ops and activation bytes of ``model`` at ``input_size``.

    ``model`` is any module (a GraphModule with ULSAM blocks included), traced here, or a
    :class:`~ulsam_inject.graph.trace.Traced`, whose graph and recorded shapes are reused.
    ``input_size`` is (channels, height, width), batch 1; it defaults to 3x224x224 for a
    module and to the traced size for a ``Traced`` (a different size raises
    :class:`~ulsam_inject.errors.InputSizeError`; a ``Traced`` made without shapes gets
    them recorded in its nodes). The model is not changed: no hooks, no
    new state, train/eval flags restored.

    Mutated: only a ``Traced`` given without shapes, whose nodes get their
    ``node.meta["value"]`` recorded (what :func:`~ulsam_inject.graph.trace.trace_model`
    would have recorded), so that later counts of the same graph reuse them.

    Raises :class:`~ulsam_inject.errors.TraceError` or
    :class:`~ulsam_inject.errors.ShapeError` when the model cannot be traced or run.

    Example:
        >>> import torch
        >>> from ulsam_inject import ULSAM
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), ULSAM(16, 4))
        >>> cost = count(model, (3, 32, 32))
        >>> cost.macs == 32 * 32 * 16 * 27 + 2 * 16 * 32 * 32, cost.params
        (True, 540)
    """
    if isinstance(model, Traced):
        if input_size is not None and tuple(input_size) != model.input_size:
            check_input_size(input_size)
            raise InputSizeError(
                f"input size {tuple(input_size)} differs from the traced model's "
                f"{model.input_size}; trace again at that size, or leave input_size out"
            )
        traced = model
        if any("value" not in n.meta for n in traced.graph_module.graph.nodes):
            propagate_shapes(traced.graph_module, traced.input_size)
        owner: nn.Module = traced.root if traced.root is not None else traced.graph_module
    else:
        check_model(model, function="count", accepted="an nn.Module or a Traced")
        size = DEFAULT_INPUT_SIZE if input_size is None else input_size
        check_input_size(size)
        check_input_limits(size)
        traced = trace_model(model, (size[0], size[1], size[2]), leaf_types=BLOCK_TYPES)
        owner = model
    per_node = tuple(_price_graph(traced.graph_module, depth=0))
    parameters = list(owner.parameters())
    return Cost(
        input_size=traced.input_size,
        params=sum(p.numel() for p in parameters),
        trainable_params=sum(p.numel() for p in parameters if p.requires_grad),
        buffers=sum(b.numel() for b in owner.buffers()),
        macs=sum(n.macs for n in per_node),
        other_ops=sum(n.other_ops for n in per_node),
        bytes_read=sum(n.bytes_read for n in per_node),
        bytes_written=sum(n.bytes_written for n in per_node),
        uncounted=_union(*(n.uncounted for n in per_node)),
        uncounted_macs=_union(*(n.uncounted_macs for n in per_node)),
        per_node=per_node,
    )


def _union(*groups: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(chain.from_iterable(groups)))


def _value(node: fx.Node) -> Any:
    return node.meta.get("value")


def _price_graph(graph_module: fx.GraphModule, depth: int) -> Iterator[NodeCost]:
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        yield _price_node(graph_module, node, modules, depth)


def _price_node(
    root: fx.GraphModule, node: fx.Node, modules: dict[str, nn.Module], depth: int
) -> NodeCost:
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    target = _target_name(node, module)
    scope = (node.meta.get("scope") or (None,))[-1]
    if node.op in ("placeholder", "output", "get_attr"):
        params = 0
        if node.op == "get_attr":
            attribute = _attribute(root, str(node.target))
            params = attribute.numel() if isinstance(attribute, nn.Parameter) else 0
        return NodeCost(node.name, node.op, target, None, 0, 0, 0, 0, params, scope)
    params = _module_params(module) if module is not None else 0
    path = str(node.target) if module is not None else None
    output = _value(node)
    if not tensors(output):
        # Shape arithmetic, asserts, x.size(): Python values, nothing computed on tensors.
        return NodeCost(node.name, node.op, target, path, 0, 0, 0, 0, params, scope)
    inputs = tuple(fx.node.map_arg(node.args, _value))
    macs, other, uncounted, uncounted_macs = _price_call(
        node, inputs, output, module, target, depth
    )
    read = written = 0
    if moves_data(node, inputs, output, module):
        read = sum(nbytes(_value(n)) for n in node.all_input_nodes if n.op != "get_attr")
        written = nbytes(output)
    return NodeCost(
        node.name,
        node.op,
        target,
        path,
        macs,
        other,
        read,
        written,
        params,
        scope,
        uncounted,
        uncounted_macs,
    )


def _price_call(
    node: fx.Node,
    inputs: tuple[Any, ...],
    output: Any,
    module: nn.Module | None,
    target: str,
    depth: int,
) -> tuple[int, int, tuple[str, ...], tuple[str, ...]]:
    """(MACs, other ops, uncounted names, names with uncounted MACs) of one call."""
    rule: cost_rules.Rule | None
    if module is not None:
        rule = cost_rules.module_rule(module)
    elif node.op == "call_method":
        rule = cost_rules.method_rule(str(node.target))
    else:
        rule = cost_rules.FUNCTION_RULES.get(node.target)  # type: ignore[arg-type]
    if rule is not None:
        try:
            macs, other = rule(node, inputs, output, module)
            return macs, other, (), ()
        except NoRule:
            pass
    kwargs = dict(fx.node.map_arg(node.kwargs, _value))
    if module is not None and not isinstance(module, BLOCK_TYPES) and depth < MAX_OPEN_DEPTH:
        opened = _open_module(module, inputs, kwargs, depth + 1)
        if opened is not None:
            return opened
    macs_or_none = _flop_counter_macs(node, module, inputs, kwargs)
    if macs_or_none is None:
        return 0, 0, (target,), (target,)
    return macs_or_none, 0, (target,), ()


def _target_name(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op != "call_function":
        return str(node.target)
    fn = node.target
    name = getattr(fn, "__name__", str(fn))
    home = getattr(fn, "__module__", None) or ""
    if home in ("_operator", "operator"):
        return f"operator.{name}"
    if home == "torch" or home.startswith("torch.") or home == "builtins" or not home:
        owner = "F" if home == "torch.nn.functional" else "torch"
        return name if home == "builtins" else f"{owner}.{name}"
    return f"{home}.{getattr(fn, '__qualname__', name)}"


def _attribute(root: nn.Module, path: str) -> Any:
    value: Any = root
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Meta stand-ins for a module's parameters (still Parameters) and buffers."""
    state: dict[str, torch.Tensor] = {
        name: nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for name, t in module.named_parameters(remove_duplicate=False)
    }
    for name, t in module.named_buffers(remove_duplicate=False):
        state[name] = torch.empty_like(t, device="meta")
    return state


# -- opening opaque leaves ---------------------------------------------------------------


def _open_module(
    module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], depth: int
) -> tuple[int, int, tuple[str, ...], tuple[str, ...]] | None:
    """Trace a leaf on its own (eval mode) and price it op by op; None if that fails."""
    try:
        signature = inspect.signature(module.forward)
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
            return None
        bound = signature.bind(*inputs, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError):
        return None
    # Python values (flags, sizes) are baked in, so the code can branch on them.
    concrete = {k: v for k, v in bound.arguments.items() if not tensors(v)}
    # Tracing runs the leaf's code for real on whatever is not a proxy (a buffer updated in
    # place, a shape check): with meta parameters and buffers it can change nothing of
    # the user's, and shape-specialized tracing computes shapes only.
    with (
        eval_mode(module),
        torch.no_grad(),
        _reparametrize_module(module, _meta_state(module)),
    ):
        graph = _trace_leaf(module, bound.arguments, concrete)
        if graph is None:
            return None
        graph_module = fx.GraphModule(module, graph)
        try:
            ShapeRecorder(graph_module).run(*bound.arguments.values())
        except Exception:
            return None
    priced = list(_price_graph(graph_module, depth))
    return (
        sum(n.macs for n in priced),
        sum(n.other_ops for n in priced),
        _union(*(n.uncounted for n in priced)),
        _union(*(n.uncounted_macs for n in priced)),
    )


def _trace_leaf(
    module: nn.Module, arguments: dict[str, Any], concrete: dict[str, Any]
) -> fx.Graph | None:
    """Trace symbolically (failing submodules made leaves), else with concrete shapes."""
    leaves: set[str] = set()
    for _ in range(MAX_LEAF_RETRIES):
        tracer = ScopeTracer(leaves, BLOCK_TYPES)
        try:
            return tracer.trace(module, concrete_args=concrete)
        except Exception:
            if tracer.failed_path is None or tracer.failed_path in leaves:
                break
            leaves.add(tracer.failed_path)
    # Code that branches on shapes (``if h % patch: pad``) traces once shapes are concrete:
    # the graph is then specific to these shapes, which is all that pricing needs.
    try:
        from torch.fx.experimental.meta_tracer import MetaTracer
    except ImportError:  # pragma: no cover - experimental API
        return None

    class ShapeTracer(MetaTracer):
        # Never add modules made in forward to the user's module (MetaTracer would).
        allow_insert_stateless_mods = False

        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return isinstance(m, BLOCK_TYPES) or super().is_leaf_module(m, module_qualified_name)

    metas = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not compute metadata" for some ops
            return ShapeTracer().trace(module, meta_args=metas, concrete_args=concrete)
    except Exception:
        return None


def _flop_counter_macs(
    node: fx.Node, module: nn.Module | None, inputs: tuple[Any, ...], kwargs: dict[str, Any]
) -> int | None:
    """MACs of one opaque call from FlopCounterMode on meta tensors; None if it cannot run."""
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad():
            if module is not None:
                with eval_mode(module), counter:
                    torch.func.functional_call(module, _meta_state(module), inputs, kwargs)
            elif node.op == "call_method":
                with counter:
                    getattr(inputs[0], str(node.target))(*inputs[1:], **kwargs)
            else:
                with counter:
                    node.target(*inputs, **kwargs)  # type: ignore[operator]
    except Exception:
        return None
    return counter.get_total_flops() // 2
