"""Stages: the depthwise/pointwise blocks of a traced compact CNN, found on its fx graph.

A stage is what a reader of the model's code calls a block: an inverted residual, a
depthwise-separable pair, a shuffle unit. It is found from the module tree and the data
flow, not from model names:

- *anchors* are spatial grouped convolutions: depthwise (``groups == in_channels``, depth
  multipliers allowed) or grouped with a kernel larger than 1x1 (RegNet's blocks);
- a module is *composite* when it (or a numbered container inside it) runs two children
  that hold anchors one after the other (data flows from one to the next), like a
  ``Sequential`` of blocks; parallel branches (a ShuffleNet downsampling unit) are not;
- walking down from the root, the first module that holds anchors and is not composite is
  a stage; a numbered container whose convolutions all lie in one child hands over to that
  child (timm's one-block ``blocks.0`` -> ``blocks.0.0``);
- an anchor laid flat in a composite container (a stem written as one ``Sequential``) is a
  stage too: the depthwise conv through the next pointwise conv and its norm/activation,
  named after its first and last modules (``layers.3-8``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ulsam_inject.graph.modes import TRAINING_FLAG
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, node_shape
from ulsam_inject.graph.trace import LeafTypes, Traced, trace_model
from ulsam_inject.graph.tree import ModelTree, is_anchor_conv, is_block_path, is_pointwise_conv

_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Stage:
    """A depthwise/pointwise block of a traced model.

    ``height`` and ``width`` are those of the stage's output; ``replaceable`` means the
    output has the input's shape, so ULSAM can take the stage's place.
    """

    index: int
    name: str
    kind: str
    in_channels: int
    out_channels: int
    stride: int
    height: int
    width: int
    residual: bool
    replaceable: bool
    input_node: str = field(repr=False)
    output_node: str = field(repr=False)
    nodes: tuple[str, ...] = field(repr=False)
    modules: tuple[str, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The public fields, as in ``ulsam-inject stages --json``."""
        data = asdict(self)
        for private in ("input_node", "output_node", "nodes", "modules"):
            data.pop(private)
        return data


def find_stages(
    model: nn.Module | Traced,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    *,
    leaf_types: LeafTypes = (),
    block_types: LeafTypes = (),
) -> list[Stage]:
    """List the depthwise/pointwise stages of ``model`` in execution order.

    ``leaf_types`` are passed to :func:`~ulsam_inject.graph.trace.trace_model` when
    ``model`` is not traced yet; calls of ``block_types`` modules (and of anything under
    the ``ulsam`` container of a retrofitted model) never become part of a stage.

    Example:
        >>> import torchvision
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> [s.name for s in stages][:3], len(stages)
        (['features.1', 'features.2', 'features.3'], 17)
    """
    if isinstance(model, Traced):
        traced = model
    else:
        traced = trace_model(model, input_size, leaf_types=leaf_types)
    return _discover(ModelTree(traced, tuple(block_types)))


def module_as_stage(traced: Traced, path: str, *, block_types: LeafTypes = ()) -> Stage | None:
    """The call of the module at ``path`` as a position (``kind="module"``, ``index=-1``):
    for positions that name any module whose output is one 4-D map (``layer3`` of a
    ResNet), not only found stages. None when its code reads more than one activation,
    gives more than one, or gives no 4-D map.
    """
    tree = ModelTree(traced, tuple(block_types))
    nodes = tree.region.get(path, [])
    if not nodes:
        return None
    stage = _make_stage(tree, path, nodes, (path,))
    if stage is None:
        return None
    return dataclasses.replace(stage, kind="module")


def activation_inputs(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """The nodes outside ``nodes`` whose values flow into them, but for parameters, buffers
    and the model's train/eval flag: the activations a stage (or region) reads."""
    inside = set(nodes)
    return {
        parent
        for node in inside
        for parent in node.all_input_nodes
        if parent not in inside
        and parent.op != "get_attr"
        and not (parent.op == "call_module" and parent.target == TRAINING_FLAG)
    }


def _discover(tree: ModelTree) -> list[Stage]:
    """Walk down from the root (:func:`_visit`) and number the stages in execution order.

    Three ways a stage is found: a module that holds anchors and is not composite
    (:func:`_add_module_stage`); an anchor laid flat in a container, through the next
    pointwise conv (:func:`_add_flat_stage`); a depthwise-only module and its pointwise
    sibling (:func:`_add_pair_stage`).
    """
    found: list[tuple[int, Stage]] = []
    _visit(tree, "", found, is_root=True)
    found.sort(key=lambda item: item[0])
    return [
        Stage(index=i, **{k: v for k, v in asdict(stage).items() if k != "index"})
        for i, (_, stage) in enumerate(found)
    ]


def _visit(
    tree: ModelTree, path: str, found: list[tuple[int, Stage]], *, is_root: bool = False
) -> None:
    if not tree.anchors_in(path):
        return
    if path in tree.conv_anchor_paths:
        _add_flat_stage(tree, path, found)
        return
    if path in tree.leaf_anchor_paths:
        # An untraceable leaf holding anchors is one opaque call: take it whole.
        _add_module_stage(tree, path, found)
        return
    children = [c for c in tree.children(path) if tree.anchors_in(c)]
    if is_root or tree.is_composite(path):
        for child in children:
            if not _add_pair_stage(tree, path, child, found):
                _visit(tree, child, found)
        return
    conv_children = [c for c in tree.children(path) if tree.convs_in(c)]
    if (
        tree.is_container(path)
        and len(conv_children) == 1
        and conv_children[0] not in tree.conv_anchor_paths
    ):
        _visit(tree, conv_children[0], found)
        return
    _add_module_stage(tree, path, found)


def _add_pair_stage(
    tree: ModelTree, parent: str, child: str, found: list[tuple[int, Stage]]
) -> bool:
    """A depthwise-only module and the pointwise sibling after it, as one stage.

    MobileOne and hand-written MobileNetV1s lay a block out as sibling modules
    (``dw conv-bn-act``, ``pw conv-bn-act``) in one ``Sequential``: no module encloses
    the pair, so the stage spans the siblings and is named ``stages.1.0-1``.
    """
    if child in tree.anchor_paths or tree.is_composite(child):
        return False
    convs = tree.conv_modules(child)
    if not convs or not all(map(is_anchor_conv, convs)):
        return False
    siblings = tree.children(parent)
    taken: list[str] = []
    seen_pointwise = False
    for sibling in siblings[siblings.index(child) + 1 :]:
        nodes = tree.region.get(sibling)
        if not nodes or tree.anchors_in(sibling):
            break
        sibling_convs = tree.conv_modules(sibling)
        if sibling_convs:
            if seen_pointwise or not all(map(is_pointwise_conv, sibling_convs)):
                break
            seen_pointwise = True
        elif node_shape(nodes[-1]) != node_shape(tree.region[child][-1]):
            break  # only shape-keeping modules (norm, activation) ride along
        taken.append(sibling)
    if not seen_pointwise:
        return False
    modules = (child, *taken)
    nodes = sorted({n for m in modules for n in tree.region[m]}, key=tree.order.__getitem__)
    name = f"{child}-{taken[-1].rsplit('.', 1)[-1]}"
    stage = _make_stage(tree, name, nodes, modules)
    if stage is None:
        return False
    found.append((tree.order[nodes[0]], stage))
    return True


def _add_module_stage(tree: ModelTree, path: str, found: list[tuple[int, Stage]]) -> None:
    nodes = tree.region.get(path, [])
    stage = _make_stage(tree, path, nodes, (path,))
    if stage is not None:
        found.append((tree.order[nodes[0]], stage))


def _add_flat_stage(tree: ModelTree, anchor_path: str, found: list[tuple[int, Stage]]) -> None:
    anchor = next(n for n in tree.anchors if n.target == anchor_path)
    nodes = [anchor]
    seen_pointwise = False
    node = anchor
    container = anchor_path.rpartition(".")[0]
    while len(node.users) == 1:
        (user,) = node.users
        if user.op == "output" or len(user.all_input_nodes) != 1:
            break
        if container and container not in user.meta.get("scope", ()):
            break  # the pair ends with the container that lays it out
        module = tree.module(user) if user.op == "call_module" else None
        if user.op == "call_module" and (
            isinstance(module, tree.block_types) or is_block_path(str(user.target))
        ):
            break  # a retrofitted model's block is not part of the stage
        if module is not None and isinstance(module, nn.Conv2d):
            if seen_pointwise or not is_pointwise_conv(module):
                break
            seen_pointwise = True
        elif node_shape(user) is None or node_shape(user) != node_shape(node):
            # Only shape-keeping ops (norm, activation) ride along: a pool, a flatten
            # or a classifier after the last pair is not part of the stage.
            break
        nodes.append(user)
        node = user
    module_paths = [str(n.target) for n in nodes if n.op == "call_module"]
    first, last = module_paths[0], module_paths[-1]
    parent = first.rsplit(".", 1)[0]
    if len(module_paths) == 1:
        name = first
    elif last.rsplit(".", 1)[0] == parent and "." in last:
        name = f"{first}-{last.rsplit('.', 1)[-1]}"
    else:
        name = f"{first}-{last}"
    stage = _make_stage(tree, name, nodes, tuple(module_paths))
    if stage is not None:
        found.append((tree.order[anchor], stage))


def _make_stage(
    tree: ModelTree, name: str, nodes: list[fx.Node], modules: tuple[str, ...]
) -> Stage | None:
    inside = set(nodes)
    inputs = activation_inputs(nodes)
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    (source,) = inputs
    (sink,) = outputs
    in_shape, out_shape = node_shape(source), node_shape(sink)
    if in_shape is None or out_shape is None or len(in_shape) != 4 or len(out_shape) != 4:
        return None
    # The convs' own strides, or the shapes where something else downsamples (a pool);
    # shapes alone would miss a stride at a 1x1 map.
    stride = max(
        round(in_shape[2] / max(out_shape[2], 1)),
        round(in_shape[3] / max(out_shape[3], 1)),
        *(max(c.stride) for c in tree.convs(nodes)),
        1,
    )
    return Stage(
        index=-1,
        name=name,
        kind=_kind(tree, nodes),
        in_channels=in_shape[1],
        out_channels=out_shape[1],
        stride=stride,
        height=out_shape[2],
        width=out_shape[3],
        residual=_has_residual(tree, nodes, source),
        replaceable=in_shape == out_shape and stride == 1,
        input_node=source.name,
        output_node=sink.name,
        nodes=tuple(n.name for n in nodes),
        modules=modules,
    )


def _kind(tree: ModelTree, nodes: list[fx.Node]) -> str:
    convs = tree.convs(nodes)
    ops = {str(n.target) for n in nodes if n.op == "call_method"}
    ops |= {getattr(n.target, "__name__", "") for n in nodes if n.op == "call_function"}
    if "transpose" in ops and {"cat", "chunk"} & ops:
        return "shuffle-unit"
    anchors = [c for c in convs if is_anchor_conv(c)]
    if any(c.groups != c.in_channels for c in anchors):
        return "grouped-conv-block"
    first_anchor = next(i for i, c in enumerate(convs) if is_anchor_conv(c)) if anchors else 0
    expands = any(
        is_pointwise_conv(c) and c.out_channels > c.in_channels for c in convs[:first_anchor]
    )
    if expands:
        return "inverted-residual"
    if len(anchors) == 1 and any(is_pointwise_conv(c) for c in convs[first_anchor:]):
        return "depthwise-separable"
    return "depthwise-block"


def _has_residual(tree: ModelTree, nodes: Iterable[fx.Node], source: fx.Node) -> bool:
    for node in nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
        if is_add and any(_passes_through(tree, arg, source) for arg in node.all_input_nodes):
            return True
    return False


def _passes_through(tree: ModelTree, node: fx.Node, source: fx.Node) -> bool:
    """Is ``node`` the stage input, reached through parameter-free one-input ops only?"""
    while node is not source:
        inputs = node.all_input_nodes
        if len(inputs) != 1 or node.op == "placeholder":
            return False
        if node.op == "call_module":
            module = tree.module(node)
            if module is None or any(True for _ in module.parameters()):
                return False
        node = inputs[0]
    return True
