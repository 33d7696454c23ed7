"""Parsing of the per-position options: ``--groups 4`` or ``--groups features.13=8``."""

from __future__ import annotations

from typing import Any

from ulsam_inject.errors import PositionError, UlsamUsageError
from ulsam_inject.guards import echo
from ulsam_inject.surgery.plan import check_groups, check_mode


def per_position(values: list[str] | None, default: Any, *, what: str, as_int: bool) -> Any:
    """One value for every position, or a mapping ``{position: value}`` plus a default."""
    if not values:
        return default
    mapping: dict[str, Any] = {}
    common: Any = None
    for raw in values:
        position, sep, value = raw.rpartition("=")
        parsed = _parse(value.strip(), what, raw, as_int)
        if sep:
            if not position.strip():
                raise PositionError(f"--{what} {echo(raw)}: the position before '=' is empty")
            _refuse_conflict(what, position.strip(), mapping.get(position.strip()), parsed)
            mapping[position.strip()] = parsed
        else:
            _refuse_conflict(what, None, common, parsed)
            common = parsed
    if not mapping:
        return default if common is None else common
    # Later entries win in a plan's mapping: the common value first, named positions after.
    return mapping if common is None else {"all": common, **mapping}


def _refuse_conflict(what: str, position: str | None, before: Any, now: Any) -> None:
    """The same position given two different values: which one was meant is unknown."""
    if before is None or before == now:
        return
    where = f"for {echo(position)}" if position is not None else "for every position"
    raise UlsamUsageError(
        f"--{what} is given twice {where}, as {before} and as {now}; give one value"
    )


def _parse(value: str, what: str, raw: str, as_int: bool) -> Any:
    # The plan checks the same way; checking here fails before the model is built.
    where = f"in --{what} {echo(raw)}"
    if not as_int:
        return check_mode(value, where)
    try:
        number: object = int(value)
    except ValueError:
        number = value
    return check_groups(number, where)
