"""Train and eval mode: restoring flags, and one graph that is right in both modes.

Symbolic tracing bakes ``if self.training`` branches into the graph. :func:`trace_model`
(:mod:`ulsam_inject.graph.trace`) therefore traces in both modes and uses the helpers here:
:func:`mode_dependent_module` finds code that differs between the two traces (it becomes a
leaf), :func:`read_training_flag` turns ``training=`` arguments that differ into a read of
the mode, and :func:`call_training_flag` makes that read a call of a :class:`TrainingFlag`.
:func:`training_mode` and :func:`eval_mode` set a mode for a while and restore every
module's own flag afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from torch import fx, nn

TRAINING_FLAG = "ulsam_training_flag"
"""The root submodule (a :class:`TrainingFlag`) that reads the model's train/eval mode."""


@contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Put every submodule in train (or eval) mode, and restore each one's flag afterwards.

    Each flag is restored, not the root's alone: ``model.train(flag)`` afterwards would
    also flip submodules the user had set to another mode (a frozen norm in eval).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2).eval())
        >>> with training_mode(net, False):
        ...     net[0].training
        False
        >>> [m.training for m in net]
        [True, False]
    """
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(module: nn.Module) -> AbstractContextManager[None]:
    """:func:`training_mode` with ``training=False``."""
    return training_mode(module, False)


class TrainingFlag(nn.Module):
    """Returns its own ``training`` flag, which ``model.train()`` / ``.eval()`` set.

    A graph reads the mode through a call to this module rather than through an attribute:
    a call survives tracing the generated code again (as unpickling does), where an
    attribute read would be frozen to the value it had then.
    """

    def forward(self) -> bool:
        return self.training


def call_training_flag(graph_module: fx.GraphModule) -> None:
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


def _signature(node: fx.Node) -> tuple[Any, ...]:
    return (node.op, str(node.target), node.meta.get("scope", ()))


def mode_dependent_module(train: fx.Graph, eval_: fx.Graph) -> str | None:
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


def read_training_flag(train: fx.Graph, eval_: fx.Graph) -> None:
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
