"""Position specs -> stages.

A position is a stage index (``13``; negative from the end, ``-1``), an inclusive range of
indices (``12-15``), a stage name (``features.13``), a glob over stage names
(``features.1*``), or ``all``. Several positions are given as a list or comma-separated;
the result is in execution order without duplicates.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fnmatch import fnmatchcase

from ulsam_inject.cost.count import BLOCK_TYPES
from ulsam_inject.errors import PositionError, did_you_mean
from ulsam_inject.graph.shapes import node_shape
from ulsam_inject.graph.stages import Stage, module_as_stage
from ulsam_inject.graph.trace import Traced
from ulsam_inject.guards import echo

PositionSpec = int | str | Sequence[int | str]

_INDEX = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def split_spec(spec: PositionSpec) -> list[int | str]:
    """Flatten a spec into tokens: lists and comma-separated strings alike; ints stay ints."""
    if isinstance(spec, (int, str)):
        items: list[object] = [spec]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise PositionError(
            f"a position is an int or a string (or a list of them), got {echo(spec)}"
        )
    tokens: list[int | str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise PositionError(f"a position is an int or a string, got {echo(item)}")
        if isinstance(item, int):
            tokens.append(item)
        else:
            tokens.extend(t.strip() for t in item.split(","))
    if not tokens or any(t == "" for t in tokens):
        raise PositionError(
            f"empty position in {echo(spec)}; e.g. '13', '12-15', 'features.1*', 'all'"
        )
    return tokens


def resolve_positions(
    spec: PositionSpec, stages: Sequence[Stage], traced: Traced | None = None
) -> list[Stage]:
    """The stages ``spec`` names, in execution order.

    An int is always a stage index. A string of digits (or two joined by ``-``) is an
    index (a range) too, unless it is a stage's name; where it could be either (stages of
    a model whose root is a ``Sequential`` are named ``"1"``, ``"2"``, ...) and the two
    readings differ, it is refused as ambiguous, with the index of each.

    Example:
        >>> import torchvision
        >>> from ulsam_inject import find_stages
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> [s.name for s in resolve_positions("12-13,-1", stages)]
        ['features.13', 'features.14', 'features.17']
    """
    tokens = split_spec(spec)
    if not stages and traced is None:
        raise PositionError("the model has no depthwise/pointwise stages to place ULSAM at")
    chosen: dict[str, Stage] = {}
    for token in tokens:
        for stage in _resolve_token(token, stages, traced):
            chosen[stage.name] = stage
    if not chosen:
        raise PositionError(NO_STAGES)
    if traced is None:
        return sorted(chosen.values(), key=lambda s: s.index)
    order = {node.name: i for i, node in enumerate(traced.graph_module.graph.nodes)}
    return sorted(chosen.values(), key=lambda s: order.get(s.output_node, -1))


NO_STAGES = (
    "the model has no depthwise/pointwise stages; name modules whose output is a 4-D map "
    "instead (e.g. --at layer3 on a ResNet)"
)


def _resolve_token(token: int | str, stages: Sequence[Stage], traced: Traced | None) -> list[Stage]:
    count = len(stages)
    valid = f"the model has {count} stages: indices 0..{count - 1} (or -{count}..-1)"
    if not count:
        valid = NO_STAGES
    if isinstance(token, int):
        if not -count <= token < count:
            raise PositionError(f"stage index {token} is out of range: {valid}")
        return [stages[token]]
    if token == "all":
        return list(stages)
    by_name = {s.name: s for s in stages}
    numeric = _INDEX.match(token) or _RANGE.match(token)
    if token in by_name:
        named = by_name[token]
        indices = _as_indices(token, count) if numeric else None
        if indices is not None and indices != [named.index]:
            raise PositionError(_ambiguous_message(token, named, indices, stages))
        return [named]
    if numeric:
        indices = _as_indices(token, count)
        if indices is None:
            if _INDEX.match(token):
                shown = token if len(token) <= 40 else echo(token)
                raise PositionError(f"stage index {shown} is out of range: {valid}")
            raise PositionError(f"stage range {echo(token)} is invalid: {valid}, start <= end")
        return [stages[i] for i in indices]
    module = _module_position(token, stages, traced)
    if module is not None:
        return [module]
    if any(ch in token for ch in "*?["):
        found = [s for s in stages if fnmatchcase(s.name, token)]
        if not found:
            raise PositionError(
                f"pattern {echo(token)} matches no stage; stages are {_sample(by_name)}"
            )
        return found
    raise PositionError(_unknown_name_message(token, by_name, traced))


def _module_position(token: str, stages: Sequence[Stage], traced: Traced | None) -> Stage | None:
    """A module named by ``token`` as a position: not a stage, not inside one or a leaf, and
    its code turns one activation into one 4-D map. None otherwise (the caller explains)."""
    if traced is None:
        return None
    root = traced.root if traced.root is not None else traced.graph_module
    if token not in dict(root.named_modules()) or traced.leaf_containing(token) is not None:
        return None
    if any(token == m or token.startswith(m + ".") for s in stages for m in s.modules):
        return None

    stage = module_as_stage(traced, token, block_types=BLOCK_TYPES)
    if stage is None or any(
        isinstance(m, BLOCK_TYPES) for m in root.get_submodule(token).modules()
    ):
        return None
    return stage


def _ambiguous_message(
    token: str, named: Stage, indices: list[int], stages: Sequence[Stage]
) -> str:
    count = len(stages)
    reading = f"index {indices[0]}" if len(indices) == 1 else f"indices {token}"
    others = ", ".join(f"{i - count} for {stages[i].name!r}" for i in indices[:4])
    return (
        f"position {echo(token)} is ambiguous: it names stage {named.index} and also reads as "
        f"{reading}; negative indices are never names: use {named.index - count} for "
        f"{named.name!r}, or {others}"
    )


def _as_indices(token: str, count: int) -> list[int] | None:
    """The stage indices a numeric token reads as (``"3"``, ``"-1"``, ``"2-5"``), or None
    when out of range."""
    if len(token) > 40:  # no model has that many stages; int() of 4300+ digits would raise
        return None
    if _INDEX.match(token):
        index = int(token)
        return [index % count] if -count <= index < count else None
    match = _RANGE.match(token)
    assert match is not None
    start, end = int(match[1]), int(match[2])
    return list(range(start, end + 1)) if start <= end < count else None


def _sample(names: dict[str, Stage]) -> str:
    listed = list(names)
    if len(listed) <= 6:
        return ", ".join(listed)
    return f"{', '.join(listed[:3])}, ..., {', '.join(listed[-2:])} ({len(listed)} in all)"


def _unknown_name_message(token: str, by_name: dict[str, Stage], traced: Traced | None) -> str:
    leaf = traced.leaf_containing(token) if traced is not None else None
    if traced is not None and leaf is not None and leaf != token:
        # Inside a leaf: say why nothing can go there, and which stage holds it, if any.
        holder = next((s for s in by_name.values() if leaf in s.modules), None)
        use = f"; the whole leaf is stage {holder.name!r}" if holder is not None else ""
        return (
            f"position {echo(token)} lies inside {leaf!r}, a leaf: a submodule torch.fx "
            f"cannot trace through ({traced.leaves[leaf]}), so nothing can be placed inside it{use}"
        )
    for stage in by_name.values():
        if any(token.startswith(m + ".") or token == m for m in stage.modules):
            return (
                f"{echo(token)} lies inside stage {stage.name!r}: a position is a whole stage "
                f"(ULSAM goes on its output); use {stage.name!r} or index {stage.index}"
            )
    if traced is not None:
        if leaf is not None:
            return (
                f"position {echo(token)} is a leaf, a submodule torch.fx cannot trace through "
                f"({traced.leaves[leaf]}) and holds no depthwise/pointwise stage"
            )
        root = traced.root if traced.root is not None else traced.graph_module
        if token in dict(root.named_modules()):
            shape = _output_shape(traced, token)
            if shape is not None and len(shape) != 4:
                return (
                    f"{echo(token)} is a module of the model, but its output is {len(shape)}-D "
                    f"{shape}: ULSAM needs a 4-D (batch, channels, height, width) activation; "
                    f"stages are {_sample(by_name)}"
                )
            return (
                f"{echo(token)} is a module of the model, but its code does not turn one "
                f"activation into one 4-D map, so ULSAM cannot go on its output; stages are "
                f"{_sample(by_name)}"
            )
    close = did_you_mean(token, by_name)
    hint = f"; {close}" if close else f"; stages are {_sample(by_name)}"
    return (
        f"unknown position {echo(token)}{hint} "
        f"(an index, a range like 12-15, a name, a glob or 'all')"
    )


def _output_shape(traced: Traced, path: str) -> tuple[int, ...] | None:
    """The shape of the last value computed inside module ``path`` (batch size 1)."""
    inside = [n for n in traced.graph_module.graph.nodes if path in n.meta.get("scope", ())]
    return node_shape(inside[-1]) if inside else None
