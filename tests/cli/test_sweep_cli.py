"""``ulsam-inject sweep``, in process: the numbers of ``inject --dry-run``, the outputs, errors."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import tiny_importable, write_tiny_module
from train.images import write_tree

from ulsam_inject.cli.app import main

MNV2 = ["torchvision:mobilenet_v2", "--input-size", "64"]
TINY = ["tinynet:tiny", "--input-size", "32", "--model-kwargs", '{"num_classes": 3}']


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def one_line_error(code: int, out: str, err: str, fragment: str) -> None:
    assert code == 2, err
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and fragment in err, err


@pytest.fixture
def tinynet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    folder = tmp_path_factory.mktemp("tinynet")
    write_tiny_module(folder)
    with tiny_importable(folder):
        yield


@pytest.mark.slow  # about 12 s: 9 configurations, then the 9 single dry runs
def test_a_cost_sweep_is_exactly_the_single_dry_run_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    positions = ["features.13", "features.16", "features.13,features.16"]
    groups = ["2", "4", "8"]
    args = ["sweep", *MNV2, "--at", ";".join(positions), "--groups", ",".join(groups)]
    code, out, sweep_err = run([*args, "--json", "--csv", "s.csv", "--plot", "s.png"], capsys)
    assert code == 0, sweep_err
    document = json.loads(out)
    assert document["schema"] == "ulsam-inject.sweep/1"
    assert document["results"] is None  # a cost-only sweep keeps no results file
    rows = document["rows"]
    assert [(r["at"], r["groups"], r["status"]) for r in rows] == [
        (at, int(g), "done") for at in positions for g in groups
    ]
    for row in rows:
        single = ["inject", *MNV2, "--at", row["at"], "--groups", str(row["groups"])]
        code, out, err = run([*single, "--dry-run", "--json"], capsys)
        assert code == 0, err
        report = json.loads(out)
        for key in ("before", "after", "change", "blocks", "uncounted"):
            assert row[key] == report[key], (row["at"], row["groups"], key)
    assert document["reference"]["after"] == rows[0]["before"]

    with open(tmp_path / "s.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["at"], r["groups"]) for r in table] == [("original", "")] + [
        (r["at"], str(r["groups"])) for r in rows
    ]
    for line, row in zip(table[1:], rows):
        assert int(line["macs_delta"]) == row["change"]["macs"]["delta"]
        assert int(line["params"]) == row["after"]["params"]
        bytes_delta = row["change"]["bytes_read"]["delta"] + row["change"]["bytes_written"]["delta"]
        assert int(line["bytes_delta"]) == bytes_delta
        assert line["top1"] == "" and line["latency_ms"] == ""
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["s.csv", "s.png"]
    assert f"wrote {tmp_path / 's.csv'}" in sweep_err


def test_skipped_combinations_are_listed_with_their_reason(
    tinynet: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sweep", *TINY, "--at", "features.0;features.1", "--groups", "2,3"]
    code, out, err = run([*args, "--mode", "after,replace"], capsys)
    assert code == 0, err
    assert "skipped features.0 g=3 after: groups=3 does not divide the 8 channels" in out
    assert "skipped features.1 g=2 replace: cannot replace features.1" in out
    assert "reference" in out
    assert "5 combination(s) skipped" in err


def test_a_rerun_reads_finished_rows_from_the_results_file(
    tinynet: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "r.jsonl"
    args = ["sweep", *TINY, "--at", "features.0", "--groups", "1,2", "--results", str(results)]
    code, out, err = run([*args, "--json"], capsys)
    assert code == 0, err
    assert [r["status"] for r in json.loads(out)["rows"]] == ["done", "done"]
    assert f"results in {results}" in err
    code, out, err = run([*args, "--groups", "1,2,4", "--json"], capsys)
    assert code == 0, err
    assert [r["status"] for r in json.loads(out)["rows"]] == ["cached", "cached", "done"]
    assert f"3 of 4 rows read from {results} (cached)" in err
    # Another seed is another sweep: refused in one line, the file untouched.
    before = results.read_bytes()
    code, out, err = run([*args, "--seed", "1"], capsys)
    one_line_error(code, out, err, "holds a sweep with other settings (")
    assert results.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--at", "features.0;;features.2"], "empty position set"),
        (["--at", "features.7"], "features.7"),
        (["--at", "features.0", "--groups", "0,2"], "positive integer"),
        (["--at", "features.0", "--mode", "after,sideways"], "not one of: after, replace"),
        (["--at", "features.0", "--epochs", "3"], "--epochs set(s) the fine-tuning of --data"),
        (["--at", "features.0", "--plot", "f.gif"], "a figure is .png or .svg"),
        (["--at", "features.0", "--csv", "same.csv", "--plot", "same.csv"], "different files"),
        (["--at", "features.0", "--results", "."], "is a directory"),
        (["--at", "features.0", "--results", "no/r.jsonl"], "does not exist"),
        (["--at", "features.0", "--data", "missing"], "missing"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(
    tinynet: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    fragment: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["sweep", *TINY, *extra], capsys)
    one_line_error(code, out, err, fragment)
    assert os.listdir(tmp_path) == []


@pytest.mark.usefixtures("one_thread")
def test_a_data_sweep_trains_writes_its_results_and_plots_accuracy(
    tinynet: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_tree(tmp_path / "data", train_per_class=16, val_per_class=4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["sweep", *TINY, "--at", "features.0;features.2", "--groups", "2,4", "--data", str(data)]
    args += ["--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--workers", "0"]
    args += ["--device", "cpu", "--plot", "acc.png"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "top-1 %" in out and "top-5 %" in out
    assert "[1/5] original: done" in err and "[5/5] features.2 g=4 after: done" in err
    results = work / "sweep-tinynet_tiny.jsonl"  # the default with --data
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(lines) == 5
    assert all(line["row"]["accuracy"]["top1"] >= 0 for line in lines)
    assert lines[0]["settings"]["training"]["epochs"] == 2
    assert (work / "acc.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(work)) == ["acc.png", results.name]


def test_bench_adds_latency_and_keeps_results_by_default(
    tinynet: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["sweep", *TINY, "--at", "features.0", "--groups", "2", "--bench", "--device", "cpu"]
    code, out, err = run([*args, "--repeats", "2", "--threads", "1", "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert document["settings"]["bench"] == {
        "batch": 1,
        "device": "cpu",
        "threads": 1,
        "warmup": 5,
        "repeats": 2,
    }
    for row in (document["reference"], *document["rows"]):
        assert row["latency"]["median_ms"] > 0 and row["latency"]["device"] == "cpu"
    assert "[1/2] original: done" in err and "[2/2] features.0 g=2 after: done" in err
    assert os.listdir(tmp_path) == ["sweep-tinynet_tiny.jsonl"]
    assert document["results"] == str(tmp_path / "sweep-tinynet_tiny.jsonl")


def test_an_unknown_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["sweep", "torchvision:mobilenet_v9", "--at", "13"], capsys)
    one_line_error(code, out, err, "mobilenet_v9")
