"""The plan: which stages get a ULSAM, with which g, inserted after or replacing the stage."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from ulsam_inject.block.module import divisors
from ulsam_inject.errors import GroupsError, ModeError, PositionError, ReplaceError
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import BLOCKS, Traced
from ulsam_inject.surgery.positions import PositionSpec, resolve_positions

Mode = Literal["after", "replace"]
MODES: tuple[Mode, ...] = ("after", "replace")
DEFAULT_GROUPS = 4
DEFAULT_MODE: Mode = "after"
CONTAINER = BLOCKS
"""Name of the submodule that holds the new blocks: state-dict keys ``ulsam.<stage>.*``."""


@dataclass(frozen=True)
class Placement:
    """One ULSAM: the stage it goes after (or replaces), its g, and its module name.

    ``module_name`` is where the block lives in the retrofitted model and ``rewrite`` which
    module's graph was changed to put it there: ``"stage"`` (the stage's own module, keys
    ``<stage>.ulsam.*``, or ``<stage>.*`` when it replaces the stage) or ``"root"`` (the
    whole model's graph, keys ``ulsam.<stage with _>.*``; the last resort). A plan fresh
    from :func:`make_plan` holds the root layout until the surgery decides.
    """

    stage: Stage
    groups: int
    mode: Mode
    module_name: str
    rewrite: str = "root"

    @property
    def channels(self) -> int:
        return self.stage.out_channels

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.stage.name, "groups": self.groups, "mode": self.mode}


@dataclass(frozen=True)
class Plan:
    """The resolved placements, in execution order."""

    placements: tuple[Placement, ...]

    def to_list(self) -> list[dict[str, Any]]:
        """``[{"at": stage name, "groups": g, "mode": mode}, ...]``: the recipe's plan."""
        return [p.to_dict() for p in self.placements]


def module_name_for(stage_name: str) -> str:
    """``features.13`` -> ``ulsam.features_13``: deterministic, readable, a valid identifier."""
    return f"{CONTAINER}.{re.sub(r'[^0-9A-Za-z_]', '_', stage_name)}"


def make_plan(
    stages: Sequence[Stage],
    at: PositionSpec,
    groups: int | Mapping[Any, int] = DEFAULT_GROUPS,
    mode: Mode | str | Mapping[Any, str] = DEFAULT_MODE,
    traced: Traced | None = None,
) -> Plan:
    """Resolve positions, group counts and modes into a checked :class:`Plan`.

    ``groups`` and ``mode`` are one value for every position, or a mapping from a position
    spec to a value (positions not in the mapping get :data:`DEFAULT_GROUPS` and
    :data:`DEFAULT_MODE`).

    Example:
        >>> import torchvision
        >>> from ulsam_inject import find_stages
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> make_plan(stages, "features.13", groups=8).to_list()
        [{'at': 'features.13', 'groups': 8, 'mode': 'after'}]
    """
    chosen = resolve_positions(at, stages, traced)
    group_of = _per_stage(groups, DEFAULT_GROUPS, stages, chosen, traced, "groups")
    mode_of = _per_stage(mode, DEFAULT_MODE, stages, chosen, traced, "mode")
    placements = []
    for stage in chosen:
        g = group_of.get(stage.name, group_of.get(None, DEFAULT_GROUPS))
        m = mode_of.get(stage.name, mode_of.get(None, DEFAULT_MODE))
        placements.append(_placement(stage, cast(int, g), str(m)))
    return Plan(tuple(placements))


def _per_stage(
    value: Any,
    default: Any,
    stages: Sequence[Stage],
    chosen: Sequence[Stage],
    traced: Traced | None,
    what: str,
) -> dict[str | None, Any]:
    """Map stage name -> value; key None holds the value for every stage not named.

    An entry whose positions include none of the chosen stages is refused: it would be
    ignored, and is most likely a typo or a position missing from ``at``.
    """
    if not isinstance(value, Mapping):
        return {None: value}
    result: dict[str | None, Any] = {None: default}
    picked = {stage.name for stage in chosen}
    for spec, item in value.items():
        try:
            targets = resolve_positions(spec, stages, traced)
        except PositionError as error:
            raise PositionError(f"in the {what} mapping: {error}") from None
        if not picked & {stage.name for stage in targets}:
            raise PositionError(
                f"{what} given for {spec!r}, which is not among the chosen positions "
                f"({', '.join(s.name for s in chosen)}); add it to the positions or drop it"
            )
        for stage in targets:
            result[stage.name] = item
    return result


def check_mode(mode: object, where: str) -> Mode:
    """``mode`` if it is one of :data:`MODES`; else :class:`ModeError` saying ``where``.

    Example:
        >>> check_mode("sideways", "for features.13")
        Traceback (most recent call last):
        ...
        ulsam_inject.errors.ModeError: mode 'sideways' for features.13 is not one of: after, replace
    """
    if mode not in MODES:
        raise ModeError(f"mode {mode!r} {where} is not one of: {', '.join(MODES)}")
    return mode


def check_groups(groups: object, where: str, channels: int | None = None) -> int:
    """``groups`` if it is a positive integer; else :class:`GroupsError` saying ``where``
    and the valid values (the divisors of ``channels``, when known)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise GroupsError(
            f"groups must be a positive integer, got {groups!r} {where}; {_valid(channels)}"
        )
    return groups


def _valid(channels: int | None) -> str:
    if channels is None:
        return f"e.g. {DEFAULT_GROUPS}"
    return f"valid groups there: {', '.join(map(str, divisors(channels)))}"


def _placement(stage: Stage, groups: int, mode: str) -> Placement:
    checked_mode = check_mode(mode, f"for {stage.name}")
    if checked_mode == "replace" and not stage.replaceable:
        raise ReplaceError(
            f"cannot replace {stage.name}: it maps {stage.in_channels} channels to "
            f"{stage.out_channels} at stride {stage.stride}; only stages whose input and "
            f"output shapes are identical can be replaced (use mode 'after')"
        )
    channels = stage.out_channels
    checked = check_groups(groups, f"for {stage.name}", channels)
    if channels % checked:
        raise GroupsError(
            f"groups={checked!r} does not divide the {channels} channels of {stage.name}; "
            f"{_valid(channels)}"
        )
    return Placement(stage, checked, checked_mode, module_name_for(stage.name))
