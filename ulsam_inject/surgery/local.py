"""Hand back the user's own model: change only the modules the plan touches.

The whole-model trace is for *seeing* (stages, shapes, costs). *Changing* happens in the
smallest module that holds the change, inside a deep copy of the user's model, so that the
root class, its methods and attributes, every untouched module, every parameter name and
every hook survive:

- ``after``: a ``Sequential`` (or a subclass that keeps its ``forward``) gets the block as
  its last child ``ulsam`` (state-dict keys ``<stage>.ulsam.*``) and stays itself. Any
  other stage module is traced alone, its children as leaves; the block is appended to
  that graph as the child ``ulsam`` and the resulting ``GraphModule`` takes the stage's
  place. The children keep their names and
  weights, the module's own parameters, buffers, plain attributes and hooks are carried
  over, so a hook on ``model.features[13]`` still fires, now on the attended map.
- ``replace``: the block is set in the stage module's place (keys ``<stage>.*``).

A stage that is not one module whose call is the whole stage (a depthwise/pointwise pair
laid flat in a ``Sequential``) is changed in its *parent*, the smallest module that encloses
it (``"rewrite": "parent:NAME"``): the parent is traced alone, its children as leaves, the
block goes in after the call of the stage's last child (``replace``: in place of the
stage's children, which are removed) as the child ``ulsam_<stage>`` (a flat stage
``layers.3-7`` gives keys ``layers.ulsam_3_7.*``), and that GraphModule takes the parent's
place, carrying its children, tensors, attributes and hooks; its other children keep their
names. Where neither works (the only enclosing module is the root, or a module cannot be
traced alone the same way in train and eval mode), the caller rewrites the whole model's
graph (:mod:`ulsam_inject.surgery.rewrite`), the last resort.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Callable

from torch import fx, nn

from ulsam_inject.block.module import ULSAM
from ulsam_inject.errors import PositionError, TraceError
from ulsam_inject.graph.modes import training_mode
from ulsam_inject.graph.trace import Traced
from ulsam_inject.surgery.plan import Placement, Plan

BLOCK_CHILD = "ulsam"
"""The child that holds the block inside a stage module: keys ``<stage>.ulsam.*``."""

# A module's own state that a GraphModule standing in for it must carry over: the hooks.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def stage_rewritable(traced: Traced, placement: Placement) -> bool:
    """Whether the placement's stage is one module whose call is exactly the stage.

    True when ``stage.name`` names a module, every graph node made by that module's code
    belongs to the stage, and only the stage's output is read outside it.
    """
    stage = placement.stage
    root = traced.root if traced.root is not None else traced.graph_module
    if stage.name not in dict(root.named_modules()):
        return False
    prefix = stage.name + "."
    modules = dict(traced.graph_module.named_modules())
    made_here = {
        node.name
        for node in traced.graph_module.graph.nodes
        if (
            any(p == stage.name or p.startswith(prefix) for p in node.meta.get("scope", ()))
            or (node.op == "call_module" and str(node.target) == stage.name)
        )
        # A block put in by an earlier retrofit runs in the stage's code but is not part of
        # the stage: rewrite_stages refuses a second one there.
        and not (node.op == "call_module" and isinstance(modules.get(str(node.target)), ULSAM))
    }
    if not made_here or made_here != set(stage.nodes):
        return False
    read_outside = {
        node.name
        for node in traced.graph_module.graph.nodes
        if node.name in made_here and any(u.name not in made_here for u in node.users)
    }
    return read_outside == {stage.output_node}


def where_to_rewrite(traced: Traced, placement: Placement) -> str | None:
    """``"stage"``, ``"parent:NAME"`` or None (only the whole model's graph can hold it)."""
    if stage_rewritable(traced, placement):
        return "stage"
    parent = _enclosing_parent(traced, placement)
    return None if parent is None else f"parent:{parent}"


def rewrite_stages(
    model: nn.Module,
    plan: Plan,
    make_block: Callable[[Placement], ULSAM],
    traced: Traced,
) -> Plan | None:
    """Apply ``plan`` to ``model`` (a copy the caller owns) stage by stage, in place.

    Returns the plan with each placement's final ``module_name`` and ``rewrite``
    (``"stage"`` or ``"parent:NAME"``), or None (``model`` untouched) when some stage can
    be changed in neither its own module nor its parent.
    """
    where = {p.stage.name: where_to_rewrite(traced, p) for p in plan.placements}
    if None in where.values():
        return None
    parents: dict[str, list[Placement]] = {}
    for placement in plan.placements:
        kind = where[placement.stage.name]
        if kind is not None and kind.startswith("parent:"):
            parents.setdefault(kind.partition(":")[2], []).append(placement)
    stage_names = [name for name, kind in where.items() if kind == "stage"]
    if any(_encloses(name, parent) for name in stage_names for parent in parents):
        return None  # a stage module that holds a parent to rewrite: one graph must do both
    wrapped: dict[str, nn.Module] = {}
    for placement in plan.placements:
        if where[placement.stage.name] != "stage" or placement.mode != "after":
            continue
        module = model.get_submodule(placement.stage.name)
        existing = getattr(module, BLOCK_CHILD, None)
        if isinstance(existing, ULSAM):
            raise PositionError(
                f"{placement.stage.name} has a ULSAM block already "
                f"({placement.stage.name}.{BLOCK_CHILD}): the model was retrofitted "
                f"there before; choose other positions"
            )
        if existing is not None:
            raise TraceError(
                f"the stage {placement.stage.name} already has an attribute "
                f"{BLOCK_CHILD!r} that is not ulsam_inject's"
            )
        if type(module).forward is nn.Sequential.forward:
            # A Sequential runs its children in order: a new last child is the change,
            # and the module stays itself (class, indexing, hooks).
            wrapped[placement.stage.name] = _appended(module, make_block(placement))
            continue
        graph = _trace_alone(module)
        if graph is None:
            return None
        new = _as_graph_module(module, graph)
        _insert_after(new, _output_value(new), BLOCK_CHILD, make_block(placement))
        wrapped[placement.stage.name] = new
    new_parents: dict[str, fx.GraphModule] = {}
    names: dict[str, str] = {}
    for parent, placements in parents.items():
        module = model.get_submodule(parent)
        graph = _trace_alone(module)
        if graph is None:
            return None
        new = _as_graph_module(module, graph)
        for placement in placements:
            child = _parent_block_name(parent, placement)
            if not _put_in_parent(new, parent, placement, child, make_block):
                return None
            names[placement.stage.name] = f"{parent}.{child}"
        new.recompile()
        new_parents[parent] = new
    # Every change could be made: apply them. Parents first, so that a stage inside one
    # is set in the new parent, which shares the old one's children.
    for parent, new in new_parents.items():
        model.set_submodule(parent, new)
    placements = []
    for placement in plan.placements:
        name, kind = placement.stage.name, where[placement.stage.name]
        assert kind is not None
        if kind != "stage":
            module_name = names[name]
        elif placement.mode == "after":
            model.set_submodule(name, wrapped[name])
            module_name = f"{name}.{BLOCK_CHILD}"
        else:
            model.set_submodule(name, make_block(placement))
            module_name = name
        placements.append(dataclasses.replace(placement, module_name=module_name, rewrite=kind))
    return Plan(tuple(placements))


def _encloses(outer: str, inner: str) -> bool:
    return outer == inner or inner.startswith(outer + ".")


def _inside(node: fx.Node, path: str) -> bool:
    """Whether ``node`` was made by the code of the module at ``path``."""
    return any(_encloses(path, scope) for scope in node.meta.get("scope", ())) or (
        node.op == "call_module" and _encloses(path, str(node.target))
    )


def _enclosing_parent(traced: Traced, placement: Placement) -> str | None:
    """The smallest module (not the root) that holds the stage as a run of its children,
    the last of which computes the stage's output; None when there is none.

    For ``replace`` the run must also be exactly the stage: its children's nodes are the
    stage's nodes, and the first child reads the stage's input.
    """
    stage = placement.stage
    if not stage.modules:
        return None
    parents = [path.split(".")[:-1] for path in stage.modules]
    common: list[str] = []
    for parts in zip(*parents):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if not common:
        return None  # only the root encloses it
    parent = ".".join(common)
    root = traced.root if traced.root is not None else traced.graph_module
    modules = dict(root.named_modules())
    if parent not in modules or isinstance(modules[parent], ULSAM):
        return None
    children = list(dict.fromkeys(path[len(parent) + 1 :].split(".")[0] for path in stage.modules))
    nodes = {node.name: node for node in traced.graph_module.graph.nodes}
    output = nodes[stage.output_node]
    last = f"{parent}.{children[-1]}"
    region = [n for n in traced.graph_module.graph.nodes if _inside(n, last)]
    leaving = [n for n in region if any(not _inside(u, last) for u in n.users)]
    if leaving != [output]:
        return None  # the last child's result is not the stage's output
    if placement.mode == "replace":
        paths = [f"{parent}.{child}" for child in children]
        graph = traced.graph_module.graph
        made = {n.name for n in graph.nodes if any(_inside(n, p) for p in paths)}
        if made != set(stage.nodes):
            return None
    return parent


def _parent_block_name(parent: str, placement: Placement) -> str:
    """``layers.3-7`` in ``layers`` -> ``ulsam_3_7``: the block's child name in the parent."""
    relative = placement.stage.name[len(parent) + 1 :]
    return f"{BLOCK_CHILD}_{re.sub(r'[^0-9A-Za-z_]', '_', relative)}"


def _put_in_parent(
    new: fx.GraphModule,
    parent: str,
    placement: Placement,
    child: str,
    make_block: Callable[[Placement], ULSAM],
) -> bool:
    """Put the placement's block into the parent's graph ``new``; False when its graph
    does not call the stage's children once each, in a chain."""
    if hasattr(new, child):
        raise PositionError(
            f"{parent} has a child {child!r} already: the model was retrofitted at "
            f"{placement.stage.name} before; choose other positions"
        )
    children = list(
        dict.fromkeys(p[len(parent) + 1 :].split(".")[0] for p in placement.stage.modules)
    )
    calls = {str(n.target): n for n in new.graph.nodes if n.op == "call_module"}
    counts: dict[str, int] = {}
    for node in new.graph.nodes:
        if node.op == "call_module":
            counts[str(node.target)] = counts.get(str(node.target), 0) + 1
    if any(counts.get(c) != 1 for c in children):
        return False
    block = make_block(placement)
    if placement.mode == "after":
        _insert_after(new, calls[children[-1]], child, block)
        _move_child_after(new, child, children[-1])
        return True
    chain = [calls[c] for c in children]
    for before, after in itertools.pairwise(chain):
        if after.all_input_nodes != [before] or len(before.users) != 1:
            return False
    if len(chain[0].all_input_nodes) != 1:
        return False
    (source,) = chain[0].all_input_nodes
    new.add_module(child, block)
    _move_child_after(new, child, children[-1])
    with new.graph.inserting_after(chain[-1]):
        attended = new.graph.call_module(child, (source,))
    chain[-1].replace_all_uses_with(attended)
    for node in reversed(chain):
        new.graph.erase_node(node)
    for name in children:  # the replaced stage goes, as it does from a stage's own module
        new.delete_submodule(name)
    return True


def _move_child_after(module: nn.Module, child: str, anchor: str) -> None:
    """Reorder ``module``'s children so ``child`` follows ``anchor``: printing, ``named_modules``
    and the state dict then list the block where it runs, not at the end of the parent."""
    moved = module._modules.pop(child)
    order = list(module._modules.items())
    at = next(i for i, (name, _) in enumerate(order) if name == anchor) + 1
    order.insert(at, (child, moved))
    module._modules = dict(order)


def _appended(sequential: nn.Module, block: ULSAM) -> nn.Module:
    """A shallow copy of ``sequential`` with ``block`` as its last child ``ulsam``.

    A copy, so that nothing is changed unless every placement can be made; it shares the
    children, parameters and hooks of the one it replaces.
    """
    new = copy.copy(sequential)
    new._modules = dict(sequential._modules)
    new.add_module(BLOCK_CHILD, block)
    return new


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own code; every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace_alone(module: nn.Module) -> fx.Graph | None:
    """The module's graph, or None when it cannot be traced alone or its code differs
    between train and eval mode (symbolic tracing would freeze one of them)."""
    graphs = []
    for training in (True, False):
        try:
            with training_mode(module, training):
                graphs.append(_ChildrenAsLeaves().trace(module))
        except Exception:  # any failure of user code under tracing: fall back, not fail
            return None
    train, evaluate = graphs
    if str(train) != str(evaluate):
        return None
    outputs = [node for node in train.nodes if node.op == "output"]
    if len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return None  # a tuple or a constant comes out: there is no one map to attend
    return evaluate


def _as_graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``module`` as a GraphModule of ``graph`` that stands in for it: its children,
    tensors, hooks and plain attributes carried over, under their own names."""
    new = fx.GraphModule(module, graph, class_name=type(module).__name__)
    # Everything the module owned, used by its forward or not, keeps its name and place.
    for name, child in module.named_children():
        new.add_module(name, child)
    for name, parameter in module._parameters.items():
        new._parameters[name] = parameter
    for name, buffer in module._buffers.items():
        new._buffers[name] = buffer
    new._non_persistent_buffers_set |= set(module._non_persistent_buffers_set)
    for key in _HOOK_DICTS:
        if key in vars(module):
            setattr(new, key, getattr(module, key))
    for key, attribute in vars(module).items():
        if not key.startswith("_") and key not in vars(new):
            setattr(new, key, attribute)  # plain attributes (out_channels, use_res_connect...)
    new.training = module.training  # its own flag only: children keep theirs
    return new


def _output_value(new: fx.GraphModule) -> fx.Node:
    output = next(node for node in new.graph.nodes if node.op == "output")
    value = output.args[0]
    assert isinstance(value, fx.Node)
    return value


def _insert_after(new: fx.GraphModule, value: fx.Node, child: str, block: ULSAM) -> None:
    """Add ``block`` as ``child`` of ``new`` and send every reader of ``value`` through it."""
    new.add_module(child, block)
    with new.graph.inserting_after(value):
        attended = new.graph.call_module(child, (value,))
    value.replace_all_uses_with(attended, delete_user_cb=lambda user: user is not attended)
    new.recompile()
