"""A traced model as a module tree, for stage discovery (:mod:`ulsam_inject.graph.stages`).

Each module's *region* is the graph nodes its code made (from ``node.meta["scope"]``);
*anchors* are spatial grouped convolutions (:func:`is_anchor_conv`); a module is
*composite* when two of its children that hold anchors run one after the other.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch import fx, nn

from ulsam_inject.graph.trace import BLOCKS, Traced


def is_anchor_conv(module: nn.Module) -> bool:
    """A depthwise conv, or a grouped conv with a spatial kernel."""
    if not isinstance(module, nn.Conv2d) or module.groups < 2:
        return False
    depthwise = module.groups == module.in_channels
    return depthwise or max(module.kernel_size) > 1


def is_pointwise_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.kernel_size == (1, 1)


def is_block_path(path: str) -> bool:
    """A path where a retrofit keeps a block: ``ulsam.features_13`` (the root layout),
    ``features.13.ulsam`` (a stage's), ``layers.ulsam_3_7`` (a parent's)."""
    return any(part == BLOCKS or part.startswith(BLOCKS + "_") for part in path.split("."))


class ModelTree:
    """A traced model seen as a module tree: the nodes each module's code made (its
    *region*), where the anchors are, and how data flows between modules."""

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
            if node.op == "call_module" and isinstance(self.module(node), self.block_types):
                continue  # a retrofitted model's block is in its stage's code, not its stage
            for path in node.meta.get("scope", ()):
                self.region.setdefault(path, []).append(node)
        self.anchors = [n for n in self.nodes if n.op == "call_module" and self.is_anchor(n)]
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

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm_modules.get(str(node.target))

    def is_anchor(self, node: fx.Node) -> bool:
        module = self.module(node)
        return module is not None and is_anchor_conv(module)

    def children(self, path: str) -> list[str]:
        module = self.modules.get(path)
        if module is None:
            return []
        prefix = f"{path}." if path else ""
        return [prefix + name for name, _ in module.named_children()]

    def anchors_in(self, path: str) -> list[str]:
        if not path:
            return sorted(self.anchor_paths)
        return [a for a in self.anchor_paths if a == path or a.startswith(path + ".")]

    def convs_in(self, path: str) -> bool:
        return any(
            n.op == "call_module" and isinstance(self.module(n), nn.Conv2d)
            for n in self.region.get(path, [])
        )

    def is_container(self, path: str) -> bool:
        """A Sequential or ModuleList (subclasses included), or a module of numbered children."""
        module = self.modules.get(path)
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            return True
        # A retrofit's block put into a container (``ulsam_3_7``) does not make it less of one.
        names = [
            c.rsplit(".", 1)[-1]
            for c in self.children(path)
            if not isinstance(self.modules[c], self.block_types) and not is_block_path(c)
        ]
        return bool(names) and all(name.isdigit() for name in names)

    def first_index(self, path: str) -> int:
        nodes = self.region.get(path)
        return self.order[nodes[0]] if nodes else len(self.nodes)

    def flows(self, source: str, target: str) -> bool:
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

    def is_composite(self, path: str) -> bool:
        if path in self._composite:
            return self._composite[path]
        result = False
        if self.is_container(path):
            holders = sorted(
                (c for c in self.children(path) if self.anchors_in(c)), key=self.first_index
            )
            result = any(self.flows(a, b) for a, b in itertools.pairwise(holders))
        if not result:
            result = any(self.is_composite(c) for c in self.children(path) if self.anchors_in(c))
        self._composite[path] = result
        return result

    def conv_modules(self, path: str) -> list[nn.Conv2d]:
        return self.convs(self.region.get(path, []))

    def convs(self, nodes: Iterable[fx.Node]) -> list[nn.Conv2d]:
        """The Conv2d modules the nodes call, those inside called leaves included."""
        convs: list[nn.Conv2d] = []
        for node in nodes:
            module = self.module(node) if node.op == "call_module" else None
            if module is not None:
                convs += [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        return convs
