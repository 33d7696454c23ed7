"""The results file: whole lines appended, other sweeps refused, a crash's partial line dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ulsam_inject.errors import OutputError, ResultsFileError
from ulsam_inject.sweeps.results import LINE_SCHEMA, open_results

SETTINGS = {"model": "tinynet:tiny", "seed": 0, "input_size": [3, 32, 32]}
KEY_A = {"stages": ["features.0"], "groups": 2, "mode": "after"}
KEY_B = {"stages": ["features.0"], "groups": 4, "mode": "after"}


def test_rows_are_appended_as_whole_lines_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    store = open_results(path, SETTINGS)
    assert store.rows == {} and not path.exists()
    store.append(KEY_A, {"macs": 1, "blocks": [(1, 2)]})
    store.append(KEY_B, {"macs": 2})
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and path.read_text().endswith("\n")
    first = json.loads(lines[0])
    assert first["schema"] == LINE_SCHEMA and first["settings"] == SETTINGS
    assert first["key"] == KEY_A
    again = open_results(path, dict(SETTINGS))
    assert again.get(KEY_A) == {"macs": 1, "blocks": [[1, 2]]}  # as JSON reads it back
    assert again.get(KEY_B) == {"macs": 2}
    assert again.get({**KEY_B, "groups": 8}) is None
    assert again.notes == []


def test_a_file_of_other_settings_is_refused_naming_the_difference(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    open_results(path, SETTINGS).append(KEY_A, {"macs": 1})
    with pytest.raises(ResultsFileError, match=r"other settings \(seed: 0 there, 1 now\)"):
        open_results(path, {**SETTINGS, "seed": 1})


def test_a_partial_last_line_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    store = open_results(path, SETTINGS)
    store.append(KEY_A, {"macs": 1})
    store.append(KEY_B, {"macs": 2})
    text = path.read_text()
    path.write_text(text[: len(text) - 15])  # a crash in the middle of the second line
    again = open_results(path, SETTINGS)
    assert again.get(KEY_A) == {"macs": 1} and again.get(KEY_B) is None
    assert len(again.notes) == 1 and "ignored a partial last line" in again.notes[0]
    again.append(KEY_B, {"macs": 3})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["row"]["macs"] for line in lines] == [1, 3]
    assert open_results(path, SETTINGS).notes == []


def test_a_damaged_line_before_the_last_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    store = open_results(path, SETTINGS)
    store.append(KEY_A, {"macs": 1})
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ResultsFileError, match="line 1 is not a sweep results line"):
        open_results(path, SETTINGS)
    path.write_text(json.dumps({"schema": "something/1"}) + "\n")
    with pytest.raises(ResultsFileError, match="line 1 is not a sweep results line"):
        open_results(path, SETTINGS)


def test_the_results_path_must_be_writable(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        open_results(tmp_path / "missing" / "r.jsonl", SETTINGS)
    with pytest.raises(OutputError, match="is a directory"):
        open_results(tmp_path, SETTINGS)
