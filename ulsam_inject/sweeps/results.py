"""The results file of a sweep: one JSON line per finished configuration, appended.

Each line is ``{"schema": "ulsam-inject.sweep-line/1", "settings": {...}, "key": {...},
"row": {...}}``: ``settings`` say what the whole sweep measures (model spec and kwargs, a
fingerprint of the weights, input size, seed, init, the latency and training settings, the
data), ``key`` which configuration (stages, g, mode), ``row`` what came out. A rerun with
the same settings skips the configurations whose key is there; a file written with other
settings is refused, since its numbers would not compare.

Appends are crash-safe: a line is written whole in one call, flushed and fsynced before
the next configuration starts. A last line without its newline (a crash in the middle of
the write) is dropped with a note, and cut off before anything is appended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulsam_inject.errors import ResultsFileError, WriteError
from ulsam_inject.io.fileio import check_output_path

LINE_SCHEMA = "ulsam-inject.sweep-line/1"


def key_text(key: Mapping[str, Any]) -> str:
    """A configuration key as a canonical string (dictionary key of the stored rows)."""
    return json.dumps(key, sort_keys=True)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


@dataclass
class ResultsFile:
    """An open results file: the rows it holds, by key, and where to append new ones."""

    path: Path
    settings: dict[str, Any]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _valid_bytes: int | None = None  # where the last whole line ends, when a partial one follows

    def get(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.rows.get(key_text(key))

    def append(self, key: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        """Write one line for ``key`` (whole, flushed, fsynced) and remember it."""
        line = {"schema": LINE_SCHEMA, "settings": self.settings, "key": dict(key), "row": row}
        text = json.dumps(line, sort_keys=True) + "\n"
        try:
            if self._valid_bytes is not None:  # drop the partial line a crash left
                with open(self.path, "r+b") as handle:
                    handle.truncate(self._valid_bytes)
                    handle.flush()
                    os.fsync(handle.fileno())
                self._valid_bytes = None
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise WriteError(f"cannot append to {self.path}: {error.strerror or error}") from None
        self.rows[key_text(key)] = _plain(dict(row))


def open_results(path: str | os.PathLike[str], settings: Mapping[str, Any]) -> ResultsFile:
    """Read the results file at ``path`` (missing: empty) for a sweep with ``settings``.

    Raises :class:`~ulsam_inject.errors.ResultsFileError` when a line (but a partial last
    one) is not a results line, or when the file holds a sweep with other settings (the
    message names the settings that differ). The file's folder must exist and be writable.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "sweep.jsonl")
        >>> store = open_results(path, {"model": "m"})
        >>> store.append({"stages": ["a"], "groups": 4, "mode": "after"}, {"macs": 1})
        >>> open_results(path, {"model": "m"}).get({"stages": ["a"], "groups": 4, "mode": "after"})
        {'macs': 1}
    """
    target = check_output_path(path, force=True)
    plain = _plain(dict(settings))
    store = ResultsFile(target, plain)
    if not target.exists():
        return store
    try:
        data = target.read_bytes()
    except OSError as error:
        raise ResultsFileError(f"cannot read {target}: {error.strerror or error}") from None
    end = data.rfind(b"\n") + 1
    if end < len(data):
        store.notes.append(
            f"{target}: ignored a partial last line (an interrupted write); its configuration "
            f"runs again"
        )
        store._valid_bytes = end
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        line = _parse_line(raw, target, number)
        if line["settings"] != plain:
            differ = _differences(line["settings"], plain)
            raise ResultsFileError(
                f"{target} holds a sweep with other settings ({differ}); give another "
                f"--results file, or delete this one to start over"
            )
        store.rows[key_text(line["key"])] = line["row"]
    return store


def _parse_line(raw: bytes, target: Path, number: int) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        line = None
    if (
        not isinstance(line, dict)
        or line.get("schema") != LINE_SCHEMA
        or not isinstance(line.get("settings"), dict)
        or not isinstance(line.get("key"), dict)
        or not isinstance(line.get("row"), dict)
    ):
        raise ResultsFileError(
            f"{target} line {number} is not a sweep results line ({LINE_SCHEMA}); "
            f"give another --results file"
        )
    return line


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> str:
    """``"epochs: 2 there, 3 now; ..."`` for the settings that differ (at most three)."""
    parts = []
    for name in sorted(set(stored) | set(wanted)):
        if stored.get(name) != wanted.get(name):
            there, now = _short(stored.get(name)), _short(wanted.get(name))
            parts.append(f"{name}: {there} there, {now} now")
    more = f"; and {len(parts) - 3} more" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."
