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
laid flat in a ``Sequential``), or whose module cannot be traced alone the same way in
train and eval mode, cannot be changed on its own: then the caller rewrites the whole
model's graph (:mod:`ulsam_inject.surgery.rewrite`), the last resort.
"""

from __future__ import annotations

import copy
import dataclasses
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


def rewrite_stages(
    model: nn.Module, plan: Plan, make_block: Callable[[Placement], ULSAM]
) -> Plan | None:
    """Apply ``plan`` to ``model`` (a copy the caller owns) stage by stage, in place.

    Returns the plan with each placement's final ``module_name`` and ``rewrite="stage"``,
    or None (``model`` untouched) when some stage cannot be changed on its own.
    """
    wrapped: dict[str, nn.Module] = {}
    for placement in plan.placements:
        if placement.mode == "after":
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
            wrapped[placement.stage.name] = _append_block(module, graph, make_block(placement))
    placements = []
    for placement in plan.placements:
        name = placement.stage.name
        if placement.mode == "after":
            model.set_submodule(name, wrapped[name])
            module_name = f"{name}.{BLOCK_CHILD}"
        else:
            model.set_submodule(name, make_block(placement))
            module_name = name
        placements.append(dataclasses.replace(placement, module_name=module_name, rewrite="stage"))
    return Plan(tuple(placements))


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


def _append_block(module: nn.Module, graph: fx.Graph, block: ULSAM) -> fx.GraphModule:
    """``module`` as a GraphModule of ``graph`` that ends in ``block`` (child ``ulsam``)."""
    new = fx.GraphModule(module, graph, class_name=type(module).__name__)
    # Everything the module owned, used by its forward or not, keeps its name and place.
    for name, child in module.named_children():
        new.add_module(name, child)
    for name, parameter in module._parameters.items():
        new._parameters[name] = parameter
    for name, buffer in module._buffers.items():
        new._buffers[name] = buffer
    new._non_persistent_buffers_set |= set(module._non_persistent_buffers_set)
    new.add_module(BLOCK_CHILD, block)
    output = next(node for node in new.graph.nodes if node.op == "output")
    value = output.args[0]
    assert isinstance(value, fx.Node)
    with new.graph.inserting_before(output):
        attended = new.graph.call_module(BLOCK_CHILD, (value,))
    output.args = (attended,)
    new.recompile()
    for key in _HOOK_DICTS:
        if key in vars(module):
            setattr(new, key, getattr(module, key))
    for key, attribute in vars(module).items():
        if not key.startswith("_") and key not in vars(new):
            setattr(new, key, attribute)  # plain attributes (out_channels, use_res_connect...)
    new.training = module.training  # its own flag only: children keep theirs
    return new
