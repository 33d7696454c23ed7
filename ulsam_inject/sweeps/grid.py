"""The configurations of a sweep: position sets x modes x g, each resolved to stage names.

A *position set* is one ``at`` value as :func:`ulsam_inject.inject` takes it (``"13"``,
``"features.13,features.16"``, ``["features.13", "features.16"]``); the CLI separates sets
with ``;``. Each configuration puts one ULSAM, with the same g and mode, at every stage of
its set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.graph.stages import Stage
from ulsam_inject.graph.trace import Traced
from ulsam_inject.guards import echo
from ulsam_inject.surgery.plan import check_groups, check_mode
from ulsam_inject.surgery.positions import PositionSpec, resolve_positions

ORIGINAL = "original"
"""The label of the reference row: the model as given, no ULSAM."""


@dataclass(frozen=True)
class Configuration:
    """One point of the grid: ``at`` as given, the stages it names, g and mode.

    The reference row (the original model) has ``at == "original"``, no stages, and
    ``groups`` and ``mode`` None.
    """

    at: str
    stages: tuple[str, ...]
    groups: int | None
    mode: str | None

    @property
    def is_original(self) -> bool:
        return not self.stages

    def key(self) -> dict[str, Any]:
        """What identifies the configuration within a sweep (resolved names, not the spec)."""
        return {"stages": list(self.stages), "groups": self.groups, "mode": self.mode}

    def label(self) -> str:
        if self.is_original:
            return ORIGINAL
        return f"{self.at} g={self.groups} {self.mode}"


def original() -> Configuration:
    return Configuration(ORIGINAL, (), None, None)


def split_sets(text: str) -> list[str]:
    """``"13;features.16;13,16"`` -> ``["13", "features.16", "13,16"]`` (the CLI's ``--at``).

    Example:
        >>> split_sets("features.13; features.16 ;features.13,features.16")
        ['features.13', 'features.16', 'features.13,features.16']
    """
    sets = [part.strip() for part in text.split(";")]
    if not sets or any(not part for part in sets):
        raise UlsamUsageError(
            f"--at {echo(text)}: an empty position set; separate sets with ';', e.g. "
            f"'features.13;features.16;features.13,features.16'"
        )
    return sets


def parse_list(text: str, what: str) -> list[str]:
    """``"1,2,4"`` -> ``["1", "2", "4"]``; an empty item is refused."""
    items = [part.strip() for part in text.split(",")]
    if not items or any(not item for item in items):
        raise UlsamUsageError(f"--{what} {echo(text)}: give a comma-separated list, e.g. 1,2,4,8")
    return items


def check_group_values(values: Iterable[object]) -> list[int]:
    """Positive integers, duplicates dropped, order kept."""
    found: list[int] = []
    for value in values:
        number: object = value
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                number = value
        checked = check_groups(number, "in the sweep's groups")
        if checked not in found:
            found.append(checked)
    if not found:
        raise UlsamUsageError("a sweep needs at least one g")
    return found


def check_mode_values(values: Iterable[object]) -> list[str]:
    found: list[str] = []
    for value in values:
        checked = check_mode(value, "in the sweep's modes")
        if checked not in found:
            found.append(checked)
    if not found:
        raise UlsamUsageError("a sweep needs at least one mode")
    return found


def position_label(spec: PositionSpec) -> str:
    if isinstance(spec, (list, tuple)):
        return ",".join(str(item) for item in spec)
    return str(spec)


def make_grid(
    position_sets: Sequence[PositionSpec],
    groups: Sequence[int],
    modes: Sequence[str],
    stages: Sequence[Stage],
    traced: Traced | None = None,
) -> list[Configuration]:
    """Every (position set, mode, g), in that nesting order; positions resolved now.

    A position that names no stage is the user's mistake, not a combination that does not
    fit: :class:`~ulsam_inject.errors.PositionError` propagates. Two sets naming the same
    stages are one set.

    Example:
        >>> import torchvision
        >>> from ulsam_inject import find_stages
        >>> stages = find_stages(torchvision.models.mobilenet_v2())
        >>> [c.label() for c in make_grid(["13", "features.16"], [2, 4], ["after"], stages)]
        ['13 g=2 after', '13 g=4 after', 'features.16 g=2 after', 'features.16 g=4 after']
        >>> make_grid(["13"], [4], ["after"], stages)[0].stages
        ('features.14',)
    """
    if not position_sets:
        raise UlsamUsageError("a sweep needs at least one position set")
    grid: list[Configuration] = []
    seen: set[tuple[str, ...]] = set()
    for spec in position_sets:
        names = tuple(stage.name for stage in resolve_positions(spec, stages, traced))
        if names in seen:
            continue
        seen.add(names)
        for mode in modes:
            for g in groups:
                grid.append(Configuration(position_label(spec), names, g, mode))
    return grid
