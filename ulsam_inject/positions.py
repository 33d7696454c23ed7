"""Position specs -> stages.

A position is a stage index (``13``; negative from the end, ``-1``), an inclusive range of
indices (``12-15``), a stage name (``features.13``), a glob over stage names
(``features.1*``), or ``all``. Several positions are given as a list or comma-separated;
the result is in execution order without duplicates.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase

from .errors import PositionError
from .stages import Stage
from .trace import Traced, node_shape

PositionSpec = int | str | Sequence[int | str]

_INDEX = re.compile(r"^-?\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def split_spec(spec: PositionSpec) -> list[str]:
    """Flatten a spec into tokens: lists and comma-separated strings alike."""
    if isinstance(spec, (int, str)):
        items: list[object] = [spec]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise PositionError(f"a position is an int or a string (or a list of them), got {spec!r}")
    tokens: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise PositionError(f"a position is an int or a string, got {item!r}")
        tokens.extend(t.strip() for t in str(item).split(","))
    if not tokens or any(not t for t in tokens):
        raise PositionError(f"empty position in {spec!r}; e.g. '13', '12-15', 'features.1*', 'all'")
    return tokens


def resolve_positions(
    spec: PositionSpec, stages: Sequence[Stage], traced: Traced | None = None
) -> list[Stage]:
    """The stages ``spec`` names, in execution order.

    Example:
        >>> import torchvision
        >>> from ulsam_inject import find_stages
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> [s.name for s in resolve_positions("12-13,-1", stages)]
        ['features.13', 'features.14', 'features.17']
    """
    if not stages:
        raise PositionError("the model has no depthwise/pointwise stages to place ULSAM at")
    chosen: dict[int, Stage] = {}
    for token in split_spec(spec):
        for stage in _resolve_token(token, stages, traced):
            chosen[stage.index] = stage
    return [chosen[i] for i in sorted(chosen)]


def _resolve_token(token: str, stages: Sequence[Stage], traced: Traced | None) -> list[Stage]:
    count = len(stages)
    valid = f"the model has {count} stages: indices 0..{count - 1} (or -{count}..-1)"
    if token == "all":
        return list(stages)
    by_name = {s.name: s for s in stages}
    if token in by_name:
        return [by_name[token]]
    if _INDEX.match(token):
        index = int(token)
        if not -count <= index < count:
            raise PositionError(f"stage index {index} is out of range: {valid}")
        return [stages[index]]
    if match := _RANGE.match(token):
        start, end = int(match[1]), int(match[2])
        if start > end or end >= count:
            raise PositionError(f"stage range {token!r} is invalid: {valid}, start <= end")
        return list(stages[start : end + 1])
    if any(ch in token for ch in "*?["):
        found = [s for s in stages if fnmatchcase(s.name, token)]
        if not found:
            raise PositionError(
                f"pattern {token!r} matches no stage; stages are {_sample(by_name)}"
            )
        return found
    raise PositionError(_unknown_name_message(token, by_name, traced))


def _sample(names: dict[str, Stage]) -> str:
    listed = list(names)
    if len(listed) <= 6:
        return ", ".join(listed)
    return f"{', '.join(listed[:3])}, ..., {', '.join(listed[-2:])} ({len(listed)} in all)"


def _unknown_name_message(token: str, by_name: dict[str, Stage], traced: Traced | None) -> str:
    for stage in by_name.values():
        if any(token.startswith(m + ".") or token == m for m in stage.modules):
            return (
                f"{token!r} lies inside stage {stage.name!r}: a position is a whole stage "
                f"(ULSAM goes on its output); use {stage.name!r} or index {stage.index}"
            )
    if traced is not None:
        leaf = traced.leaf_containing(token)
        if leaf is not None:
            where = "is" if leaf == token else f"lies inside {leaf!r}, which is"
            return (
                f"position {token!r} {where} a leaf torch.fx cannot trace through "
                f"({traced.leaves[leaf]}), so nothing can be placed inside it"
            )
        root = traced.root if traced.root is not None else traced.graph_module
        if token in dict(root.named_modules()):
            shape = _output_shape(traced, token)
            if shape is not None and len(shape) != 4:
                return (
                    f"{token!r} is a module of the model, but its output is {len(shape)}-D "
                    f"{shape}: ULSAM needs a 4-D (batch, channels, height, width) activation; "
                    f"stages are {_sample(by_name)}"
                )
            return (
                f"{token!r} is a module of the model but not a depthwise/pointwise stage; "
                f"stages are {_sample(by_name)}"
            )
    close = difflib.get_close_matches(token, list(by_name), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; stages are {_sample(by_name)}"
    return (
        f"unknown position {token!r}{hint} (an index, a range like 12-15, a name, a glob or 'all')"
    )


def _output_shape(traced: Traced, path: str) -> tuple[int, ...] | None:
    """The shape of the last value computed inside module ``path`` (batch size 1)."""
    inside = [n for n in traced.graph_module.graph.nodes if path in n.meta.get("scope", ())]
    return node_shape(inside[-1]) if inside else None
