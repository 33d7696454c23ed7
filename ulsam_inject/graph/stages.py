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

import itertools
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ulsam_inject.graph.modes import TRAINING_FLAG
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE, node_shape
from ulsam_inject.graph.trace import BLOCKS, LeafTypes, Traced, trace_model

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
    return _StageFinder(traced, tuple(block_types)).find()


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


def is_anchor_conv(module: nn.Module) -> bool:
    """A depthwise conv, or a grouped conv with a spatial kernel."""
    if not isinstance(module, nn.Conv2d) or module.groups < 2:
        return False
    depthwise = module.groups == module.in_channels
    return depthwise or max(module.kernel_size) > 1


def is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size == (1, 1)


class _StageFinder:
    def __init__(self, traced: Traced, block_types: tuple[type[nn.Module], ...]) -> None:
        self.traced = traced
        self.block_types = block_types
        self.graph_module = traced.graph_module
        root = traced.root if traced.root is not None else traced.graph_module
        self.modules = dict(root.named_modules())
        self.gm_modules = dict(self.graph_module.named_modules())
        self.nodes = list(self.graph_module.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.region: dict[str, list[fx.Node]] = {}
        for node in self.nodes:
            if node.op == "call_module" and isinstance(self._module(node), self.block_types):
                continue  # a retrofitted model's block is in its stage's code, not its stage
            for path in node.meta.get("scope", ()):
                self.region.setdefault(path, []).append(node)
        self.anchors = [n for n in self.nodes if n.op == "call_module" and self._is_anchor(n)]
        self.conv_anchor_paths = {str(n.target) for n in self.anchors}
        # An untraceable leaf is one opaque call; it counts as holding anchors if any
        # conv inside it is one, so that a block made a leaf is still a stage.
        self.leaf_anchor_paths = {
            leaf
            for leaf in traced.leaves
            if leaf in self.modules and any(map(is_anchor_conv, self.modules[leaf].modules()))
        }
        self.anchor_paths = self.conv_anchor_paths | self.leaf_anchor_paths
        self._composite: dict[str, bool] = {}

    # -- module tree -----------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm_modules.get(str(node.target))

    def _is_anchor(self, node: fx.Node) -> bool:
        module = self._module(node)
        return module is not None and is_anchor_conv(module)

    def _children(self, path: str) -> list[str]:
        module = self.modules.get(path)
        if module is None:
            return []
        prefix = f"{path}." if path else ""
        return [prefix + name for name, _ in module.named_children()]

    def _anchors_in(self, path: str) -> list[str]:
        if not path:
            return sorted(self.anchor_paths)
        return [a for a in self.anchor_paths if a == path or a.startswith(path + ".")]

    def _convs_in(self, path: str) -> bool:
        return any(
            n.op == "call_module" and isinstance(self._module(n), nn.Conv2d)
            for n in self.region.get(path, [])
        )

    def _is_container(self, path: str) -> bool:
        """A Sequential or ModuleList (subclasses included), or a module of numbered children."""
        module = self.modules.get(path)
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            return True
        names = [c.rsplit(".", 1)[-1] for c in self._children(path)]
        return bool(names) and all(name.isdigit() for name in names)

    def _first_index(self, path: str) -> int:
        nodes = self.region.get(path)
        return self.order[nodes[0]] if nodes else len(self.nodes)

    def _flows(self, source: str, target: str) -> bool:
        """Does data flow from the nodes of module ``source`` into those of ``target``?"""
        sources = set(self.region.get(source, []))
        if not sources:
            return False
        floor = min(self.order[n] for n in sources)
        stack = list(self.region.get(target, []))
        seen: set[fx.Node] = set()
        while stack:
            node = stack.pop()
            for parent in node.all_input_nodes:
                if parent in sources:
                    return True
                if parent not in seen and self.order[parent] >= floor:
                    seen.add(parent)
                    stack.append(parent)
        return False

    def _is_composite(self, path: str) -> bool:
        if path in self._composite:
            return self._composite[path]
        result = False
        if self._is_container(path):
            holders = sorted(
                (c for c in self._children(path) if self._anchors_in(c)), key=self._first_index
            )
            result = any(self._flows(a, b) for a, b in itertools.pairwise(holders))
        if not result:
            result = any(self._is_composite(c) for c in self._children(path) if self._anchors_in(c))
        self._composite[path] = result
        return result

    # -- discovery -------------------------------------------------------------------

    def find(self) -> list[Stage]:
        found: list[tuple[int, Stage]] = []
        self._visit("", found, is_root=True)
        found.sort(key=lambda item: item[0])
        return [
            Stage(index=i, **{k: v for k, v in asdict(stage).items() if k != "index"})
            for i, (_, stage) in enumerate(found)
        ]

    def _visit(self, path: str, found: list[tuple[int, Stage]], *, is_root: bool = False) -> None:
        if not self._anchors_in(path):
            return
        if path in self.conv_anchor_paths:
            self._add_flat_stage(path, found)
            return
        if path in self.leaf_anchor_paths:
            # An untraceable leaf holding anchors is one opaque call: take it whole.
            self._add_module_stage(path, found)
            return
        children = [c for c in self._children(path) if self._anchors_in(c)]
        if is_root or self._is_composite(path):
            for child in children:
                if not self._add_pair_stage(path, child, found):
                    self._visit(child, found)
            return
        conv_children = [c for c in self._children(path) if self._convs_in(c)]
        if (
            self._is_container(path)
            and len(conv_children) == 1
            and conv_children[0] not in self.conv_anchor_paths
        ):
            self._visit(conv_children[0], found)
            return
        self._add_module_stage(path, found)

    def _add_pair_stage(self, parent: str, child: str, found: list[tuple[int, Stage]]) -> bool:
        """A depthwise-only module and the pointwise sibling after it, as one stage.

        MobileOne and hand-written MobileNetV1s lay a block out as sibling modules
        (``dw conv-bn-act``, ``pw conv-bn-act``) in one ``Sequential``: no module encloses
        the pair, so the stage spans the siblings and is named ``stages.1.0-1``.
        """
        if child in self.anchor_paths or self._is_composite(child):
            return False
        convs = self._conv_modules(child)
        if not convs or not all(map(is_anchor_conv, convs)):
            return False
        siblings = self._children(parent)
        taken: list[str] = []
        seen_pointwise = False
        for sibling in siblings[siblings.index(child) + 1 :]:
            nodes = self.region.get(sibling)
            if not nodes or self._anchors_in(sibling):
                break
            sibling_convs = self._conv_modules(sibling)
            if sibling_convs:
                if seen_pointwise or not all(map(is_pointwise_conv, sibling_convs)):
                    break
                seen_pointwise = True
            elif node_shape(nodes[-1]) != node_shape(self.region[child][-1]):
                break  # only shape-keeping modules (norm, activation) ride along
            taken.append(sibling)
        if not seen_pointwise:
            return False
        modules = (child, *taken)
        nodes = sorted({n for m in modules for n in self.region[m]}, key=self.order.__getitem__)
        name = f"{child}-{taken[-1].rsplit('.', 1)[-1]}"
        stage = self._make_stage(name, nodes, modules)
        if stage is None:
            return False
        found.append((self.order[nodes[0]], stage))
        return True

    def _conv_modules(self, path: str) -> list[nn.Conv2d]:
        return self._convs(self.region.get(path, []))

    def _convs(self, nodes: Iterable[fx.Node]) -> list[nn.Conv2d]:
        """The Conv2d modules the nodes call, those inside called leaves included."""
        convs: list[nn.Conv2d] = []
        for node in nodes:
            module = self._module(node) if node.op == "call_module" else None
            if module is not None:
                convs += [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return convs

    def _add_module_stage(self, path: str, found: list[tuple[int, Stage]]) -> None:
        nodes = self.region.get(path, [])
        stage = self._make_stage(path, nodes, (path,))
        if stage is not None:
            found.append((self.order[nodes[0]], stage))

    def _add_flat_stage(self, anchor_path: str, found: list[tuple[int, Stage]]) -> None:
        anchor = next(n for n in self.anchors if n.target == anchor_path)
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
            module = self._module(user) if user.op == "call_module" else None
            if user.op == "call_module" and (
                isinstance(module, self.block_types) or str(user.target).split(".")[0] == BLOCKS
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
        stage = self._make_stage(name, nodes, tuple(module_paths))
        if stage is not None:
            found.append((self.order[anchor], stage))

    def _make_stage(
        self, name: str, nodes: list[fx.Node], modules: tuple[str, ...]
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
            *(max(c.stride) for c in self._convs(nodes)),
            1,
        )
        return Stage(
            index=-1,
            name=name,
            kind=self._kind(nodes),
            in_channels=in_shape[1],
            out_channels=out_shape[1],
            stride=stride,
            height=out_shape[2],
            width=out_shape[3],
            residual=self._has_residual(nodes, source),
            replaceable=in_shape == out_shape and stride == 1,
            input_node=source.name,
            output_node=sink.name,
            nodes=tuple(n.name for n in nodes),
            modules=modules,
        )

    def _kind(self, nodes: list[fx.Node]) -> str:
        convs = self._convs(nodes)
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

    def _has_residual(self, nodes: Iterable[fx.Node], source: fx.Node) -> bool:
        for node in nodes:
            is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
                node.op == "call_method" and node.target in _ADD_METHODS
            )
            if is_add and any(self._passes_through(arg, source) for arg in node.all_input_nodes):
                return True
        return False

    def _passes_through(self, node: fx.Node, source: fx.Node) -> bool:
        """Is ``node`` the stage input, reached through parameter-free one-input ops only?"""
        while node is not source:
            inputs = node.all_input_nodes
            if len(inputs) != 1 or node.op == "placeholder":
                return False
            if node.op == "call_module":
                module = self._module(node)
                if module is None or any(True for _ in module.parameters()):
                    return False
            node = inputs[0]
        return True
