"""Keeping a traced model's structure across deep copies and pickling.

A GraphModule made by :func:`~ulsam_inject.graph.trace.trace_model` records which
submodules were made leaves (in the output node's ``meta``) and the module paths that
enclose each node (``node.meta["scope"]``). ``copy.deepcopy`` keeps ``node.meta``; pickling
does not (a GraphModule is pickled as code and traced again when loaded). So the structure
is also kept in a plain attribute, :data:`STRUCTURE`, which the tracer reads back when it
traces such code again.
"""

from __future__ import annotations

from torch import fx, nn

STRUCTURE = "_ulsam_inject_structure"
"""Where a traced (or retrofitted) GraphModule keeps its structure: the untraceable leaves
(in the output node's ``meta``) and each node's scope (``node.meta["scope"]``).

``copy.deepcopy`` keeps ``node.meta``. Pickling does not: a GraphModule is pickled as code
and traced again when loaded. So the structure is also kept in a plain attribute of this
name, which is pickled (and kept by deepcopy), and tracing the code again restores
``node.meta`` from it.
"""


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


def recorded_leaves(model: nn.Module) -> dict[str, str] | None:
    """The leaves of a GraphModule made by :func:`trace_model`; None for any other module."""
    if not isinstance(model, fx.GraphModule):
        return None
    outputs = [node for node in model.graph.nodes if node.op == "output"]
    leaves = outputs[0].meta.get(STRUCTURE) if outputs else None
    return dict(leaves) if isinstance(leaves, dict) else None


def restore_node_structure(root: nn.Module, node: fx.Node) -> None:
    """While tracing the code of a GraphModule made here (unpickling does), give ``node``
    back what its code cannot say: its scope, and on the output node the leaves."""
    recorded = root.__dict__.get(STRUCTURE)
    if isinstance(recorded, dict) and node.name in recorded["scopes"]:
        node.meta["scope"] = tuple(recorded["scopes"][node.name])
        if node.op == "output":
            node.meta[STRUCTURE] = dict(recorded["leaves"])
