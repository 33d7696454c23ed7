"""Parsing of the per-position options: ``--groups 4`` or ``--groups features.13=8``."""

from __future__ import annotations

from typing import Any

from ulsam_inject.errors import GroupsError, PositionError


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
                raise PositionError(f"--{what} {raw!r}: the position before '=' is empty")
            mapping[position.strip()] = parsed
        else:
            common = parsed
    if not mapping:
        return default if common is None else common
    # Later entries win in a plan's mapping: the common value first, named positions after.
    return mapping if common is None else {"all": common, **mapping}


def _parse(value: str, what: str, raw: str, as_int: bool) -> Any:
    if not as_int:
        if value not in ("after", "replace"):
            raise PositionError(f"--{what} {raw!r}: mode must be 'after' or 'replace'")
        return value
    try:
        number = int(value)
    except ValueError:
        raise GroupsError(f"--{what} {raw!r}: g must be a positive integer, e.g. 4") from None
    if number < 1:
        raise GroupsError(f"--{what} {raw!r}: g must be a positive integer, e.g. 4")
    return number
