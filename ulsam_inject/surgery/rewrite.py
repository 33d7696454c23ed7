"""Graph surgery: insert ULSAM after stages, or put it in the place of identity-shaped ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import fx, nn

from ulsam_inject.block.module import ULSAM
from ulsam_inject.errors import PositionError, TraceError
from ulsam_inject.graph.pickling import record_structure
from ulsam_inject.graph.stages import Stage, activation_inputs
from ulsam_inject.graph.trace import Traced
from ulsam_inject.surgery.plan import CONTAINER, Placement, Plan


def rewrite(
    traced: Traced, plan: Plan, make_block: Callable[[Placement], ULSAM] | None = None
) -> fx.GraphModule:
    """Apply ``plan`` to ``traced.graph_module`` in place and return it, recompiled.

    The last resort of :func:`ulsam_inject.inject`, for stages that are not a module of their
    own: the whole model becomes this graph module. New blocks come from ``make_block``
    (default: a fresh ``ULSAM`` on the model's device and dtype, in its mode) and live under
    the submodule ``ulsam`` (state-dict keys ``ulsam.<stage name with _>.*``); a replaced
    stage's modules are deleted, every other parameter and buffer keeps its key and value.

    Mutated: ``traced.graph_module`` itself (its graph, its code, a new ``ulsam``
    submodule, a replaced stage's submodules deleted, its recorded structure) and so
    ``traced``, which holds it. Rewriting in place is deliberate: copying a graph module
    here would copy every weight a second time, and :func:`ulsam_inject.inject` already works
    on a deep copy of the user's model, so the user's model is never touched. The graph
    module must not share modules with a model the caller still uses.
    """
    graph_module = traced.graph_module
    graph = graph_module.graph
    by_name = {node.name: node for node in graph.nodes}
    container = _container(graph_module)
    _check_names_free(container, plan)
    reference = next(iter(graph_module.parameters()), None)
    for placement in plan.placements:
        if make_block is not None:
            block = make_block(placement)
        else:
            block = ULSAM(placement.channels, placement.groups)
            if reference is not None:
                block = block.to(device=reference.device, dtype=reference.dtype)
            block.train(graph_module.training)
        container.add_module(placement.module_name.split(".", 1)[1], block)
        if placement.mode == "after":
            _insert_after(graph, by_name, placement)
        else:
            _replace(graph_module, by_name, placement)
    graph.lint()
    graph_module.recompile()
    record_structure(graph_module, traced.leaves)
    return graph_module


def keep_unused_tensors(
    original: nn.Module, graph_module: fx.GraphModule, removed: Iterable[Stage] = ()
) -> None:
    """Give ``graph_module`` every parameter and buffer of ``original`` it lacks, in place.

    A GraphModule keeps only what its graph uses: a learned temperature the forward never
    reads, a root buffer of statistics, a nested module's spare weight would be dropped
    from the state dict. They are set at their own names (missing parent modules made
    empty), the same tensors, with their persistence; tensors of replaced stages stay gone.
    """
    gone = tuple(f"{path}." for stage in removed for path in stage.modules)
    present = {name for name, _ in graph_module.named_parameters(remove_duplicate=False)}
    present |= {name for name, _ in graph_module.named_buffers(remove_duplicate=False)}
    for owner_path, owner in original.named_modules(remove_duplicate=False):
        prefix = f"{owner_path}." if owner_path else ""
        if gone and f"{owner_path}.".startswith(gone):
            continue
        own = [(n, t, "parameter") for n, t in owner._parameters.items() if t is not None]
        own += [(n, t, "buffer") for n, t in owner._buffers.items() if t is not None]
        for name, tensor, kind in own:
            if prefix + name in present:
                continue
            target = _module_at(graph_module, owner_path)
            if hasattr(target, name):
                continue  # the graph module has something else of that name: leave it
            if kind == "parameter":
                target.register_parameter(name, tensor)
            else:
                persistent = name not in owner._non_persistent_buffers_set
                target.register_buffer(name, tensor, persistent=persistent)
            present.add(prefix + name)


def _module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``root``, with empty modules made for missing parts."""
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module


def _container(graph_module: fx.GraphModule) -> nn.Module:
    existing = getattr(graph_module, CONTAINER, None)
    if existing is not None:
        if type(existing) is not nn.Module or any(
            not isinstance(m, ULSAM) for m in existing.children()
        ):
            raise TraceError(
                f"the model already has an attribute {CONTAINER!r} that is not ulsam_inject's"
            )
        return existing
    container = nn.Module()
    graph_module.add_module(CONTAINER, container)
    return container


def _check_names_free(container: nn.Module, plan: Plan) -> None:
    """Refuse a second block at a position: two graph nodes would call one module."""
    existing = {name for name, _ in container.named_children()}
    planned: dict[str, str] = {}
    for placement in plan.placements:
        child = placement.module_name.split(".", 1)[1]
        if child in existing:
            raise PositionError(
                f"{placement.stage.name} has a ULSAM block already ({placement.module_name}): "
                f"the model was retrofitted there before; choose other positions"
            )
        if child in planned:
            raise PositionError(
                f"stages {planned[child]} and {placement.stage.name} would both get the "
                f"module name {placement.module_name} (a stage's name with every character "
                f"but letters, digits and _ made _)"
            )
        planned[child] = placement.stage.name


def _new_node(graph: fx.Graph, placement: Placement, source: fx.Node, like: fx.Node) -> fx.Node:
    node = graph.call_module(placement.module_name, (source,))
    node.meta["scope"] = ()
    if "value" in like.meta:
        node.meta["value"] = like.meta["value"]
    return node


def _insert_after(graph: fx.Graph, by_name: dict[str, fx.Node], placement: Placement) -> None:
    output = by_name[placement.stage.output_node]
    with graph.inserting_after(output):
        block = _new_node(graph, placement, output, output)
    output.replace_all_uses_with(block, delete_user_cb=lambda user: user is not block)


def _replace(
    graph_module: fx.GraphModule, by_name: dict[str, fx.Node], placement: Placement
) -> None:
    graph = graph_module.graph
    stage = placement.stage
    region = [by_name[name] for name in stage.nodes]
    inside = set(region)
    # The stage's input now may be an earlier ULSAM's output: read it from the graph.
    (source,) = activation_inputs(region)
    output = by_name[stage.output_node]
    with graph.inserting_after(output):
        block = _new_node(graph, placement, source, output)
    output.replace_all_uses_with(block, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region):
        graph.erase_node(node)
    for path in stage.modules:
        _delete_module(graph_module, path)


def _delete_module(graph_module: fx.GraphModule, path: str) -> None:
    still_used = any(
        node.op in ("call_module", "get_attr")
        and (str(node.target) == path or str(node.target).startswith(path + "."))
        for node in graph_module.graph.nodes
    )
    if not still_used:
        graph_module.delete_submodule(path)


def identity_blocks(model: nn.Module) -> nn.Module:
    """For tests and checks: every ULSAM in ``model`` swapped for ``nn.Identity``.

    Modifies ``model`` in place (it must be a throwaway copy) and returns it. A graph calls
    its submodules by name, so the swap needs no recompiling.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, ULSAM):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Identity())
    return model
