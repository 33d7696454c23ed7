"""The sweep API on the tiny model: rows, skipped combinations, resumption, timing, training."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import ulsam_inject.sweeps.run as sweep_run
from ulsam_inject import inject, sweep
from ulsam_inject.errors import PositionError, ResultsFileError, UlsamUsageError
from ulsam_inject.sweeps import BenchSettings

SIZE = (3, 32, 32)


def tiny(tinynet: ModuleType, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return tinynet.tiny(num_classes=num_classes).eval()


def count_injects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every inject() the sweep makes, recorded (positions, g, mode)."""
    calls: list[Any] = []
    real = sweep_run.inject

    def spy(model: Any, at: Any, groups: Any, mode: Any, **kwargs: Any) -> Any:
        calls.append((tuple(at), groups, mode))
        return real(model, at=at, groups=groups, mode=mode, **kwargs)

    monkeypatch.setattr(sweep_run, "inject", spy)
    return calls


def test_rows_costs_and_skipped_combinations(tinynet: ModuleType) -> None:
    net = tiny(tinynet)
    result = sweep(
        net, "features.0;features.1", groups=[2, 3], modes=["after", "replace"], input_size=SIZE
    )
    got = [(r.config.label(), r.status) for r in result.rows]
    assert got == [
        ("features.0 g=2 after", "done"),
        ("features.0 g=3 after", "skipped"),
        ("features.0 g=2 replace", "done"),
        ("features.0 g=3 replace", "skipped"),
        ("features.1 g=2 after", "done"),
        ("features.1 g=3 after", "skipped"),
        ("features.1 g=2 replace", "skipped"),
        ("features.1 g=3 replace", "skipped"),
    ]
    reasons = {r.config.label(): r.reason for r in result.rows if r.status == "skipped"}
    assert reasons["features.0 g=3 after"] == (
        "groups=3 does not divide the 8 channels of features.0; valid groups there: 1, 2, 4, 8"
    )
    assert reasons["features.1 g=2 replace"].startswith("cannot replace features.1: it maps 8")
    assert all(r.cost is None and r.reason for r in result.rows if r.status == "skipped")
    # Each done row is the report inject() gives for that configuration.
    expected = inject(net, at="features.0", groups=2, mode="replace", input_size=SIZE, seed=0)
    assert expected.report is not None
    document = expected.report.to_dict()
    row = result.rows[2]
    assert row.cost is not None
    for key in ("before", "after", "change", "blocks", "uncounted"):
        assert row.cost[key] == document[key]
    # The original is the reference: its totals, no change.
    reference = result.reference
    assert reference.config.is_original and reference.status == "done"
    assert reference.cost is not None
    assert reference.cost["after"] == reference.cost["before"] == document["before"]
    assert reference.delta("macs") == 0 and reference.cost["blocks"] == []
    data = result.to_dict()
    assert data["schema"] == "ulsam-inject.sweep/1" and len(data["rows"]) == 8
    json.dumps(data)  # a JSON document as it is


def test_bad_positions_and_settings_are_refused(tinynet: ModuleType, tmp_path: Path) -> None:
    net = tiny(tinynet)
    with pytest.raises(PositionError, match=r"features\.9"):
        sweep(net, ["features.0", "features.9"], groups=[2], input_size=SIZE)
    with pytest.raises(UlsamUsageError, match="without data"):
        sweep(net, ["features.0"], groups=[2], input_size=SIZE, training={"epochs": 1})
    with pytest.raises(UlsamUsageError, match="epochs must be at least 1"):
        sweep(net, ["features.0"], input_size=SIZE, data=tmp_path, training={"epochs": 0})


def test_a_rerun_skips_finished_configurations(
    tinynet: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_injects(monkeypatch)
    results = tmp_path / "sweep.jsonl"
    args: dict[str, Any] = {"input_size": SIZE, "results": results}
    first = sweep(tiny(tinynet), "features.0;features.2", groups=[2, 3], **args)
    assert [r.status for r in first.rows] == ["done", "skipped", "done", "skipped"]
    assert len(calls) == 4
    # original + two done rows; skipped combinations are not stored (they cost nothing).
    assert len(results.read_text().splitlines()) == 3

    calls.clear()
    again = sweep(tiny(tinynet), "features.0;features.2", groups=[2, 3, 4], **args)
    assert again.reference.status == "cached"
    assert [(r.config.label(), r.status) for r in again.rows] == [
        ("features.0 g=2 after", "cached"),
        ("features.0 g=3 after", "skipped"),
        ("features.0 g=4 after", "done"),
        ("features.2 g=2 after", "cached"),
        ("features.2 g=3 after", "skipped"),
        ("features.2 g=4 after", "done"),
    ]
    assert calls == [
        (("features.0",), 3, "after"),
        (("features.0",), 4, "after"),
        (("features.2",), 3, "after"),
        (("features.2",), 4, "after"),
    ]
    assert again.rows[0].to_dict() == {**first.rows[0].to_dict(), "status": "cached"}
    # A sweep of other weights (another seed of the same model) is another sweep.
    torch.manual_seed(1)
    other = tinynet.tiny().eval()
    with pytest.raises(ResultsFileError, match="weights: "):
        sweep(other, "features.0", groups=[2], **args)


def test_a_crash_mid_line_reruns_only_that_configuration(
    tinynet: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "sweep.jsonl"
    sweep(tiny(tinynet), "features.0", groups=[1, 2], input_size=SIZE, results=results)
    text = results.read_text()
    results.write_text(text[: len(text) - 40])  # the last row's line, cut
    calls = count_injects(monkeypatch)
    again = sweep(tiny(tinynet), "features.0", groups=[1, 2], input_size=SIZE, results=results)
    assert [r.status for r in again.rows] == ["cached", "done"]
    assert calls == [(("features.0",), 2, "after")]
    assert len(again.notes) == 1 and "partial last line" in again.notes[0]
    assert [json.loads(line)["key"]["groups"] for line in results.read_text().splitlines()] == [
        None,
        1,
        2,
    ]


def test_a_spec_builds_the_same_weights_every_run(tinynet: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "sweep.jsonl"
    first = sweep("tinynet:tiny", "features.0", groups=[2], input_size=SIZE, results=results)
    again = sweep("tinynet:tiny", "features.0", groups=[2], input_size=SIZE, results=results)
    assert first.settings["model"] == "tinynet:tiny"
    assert [r.status for r in again.rows] == ["cached"]


def test_bench_times_each_configuration_and_the_original(tinynet: ModuleType) -> None:
    settings = BenchSettings(batch=2, device="cpu", threads=1, warmup=0, repeats=3)
    result = sweep(tiny(tinynet), "features.0", groups=[2, 3], input_size=SIZE, bench=settings)
    assert result.settings["bench"]["repeats"] == 3
    timed, skipped = result.rows
    assert skipped.latency is None
    for row in (result.reference, timed):
        assert row.latency is not None
        assert row.latency["median_ms"] > 0 and row.latency["reference_ms"] > 0
        assert row.latency["ratio"] == pytest.approx(
            row.latency["median_ms"] / row.latency["reference_ms"]
        )
        assert row.latency["batch"] == 2 and row.latency["threads"] == 1


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("epochs", "original_epochs"), [(2, 1), (1, 0)])
def test_data_fine_tunes_each_configuration_and_the_original_on_the_same_budget(
    tinynet: ModuleType,
    sweep_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    epochs: int,
    original_epochs: int,
) -> None:
    runs: list[dict[str, Any]] = []
    real = sweep_run.finetune

    def spy(model: Any, train: Any, val: Any, **settings: Any) -> Any:
        runs.append(settings)
        return real(model, train, val, **settings)

    monkeypatch.setattr(sweep_run, "finetune", spy)
    training = {"epochs": epochs, "warmup_epochs": 1, "batch_size": 8, "lr": 0.02}
    training |= {"device": "cpu", "finetune_lr": 0.005}
    result = sweep(
        tiny(tinynet, num_classes=3),
        "features.0",
        groups=[2, 3],
        input_size=SIZE,
        data=sweep_images,
        training=training,
    )
    done, skipped = result.rows
    assert skipped.accuracy is None and skipped.status == "skipped"
    for row in (result.reference, done):
        assert row.accuracy is not None
        assert 0 <= row.accuracy["top1"] <= row.accuracy["top5"] <= 1
    assert result.settings["data"]["classes"] == ["blue", "green", "red"]
    assert result.settings["data"]["train_images"] == 48
    # The retrofit: the settings as given. The original: as it is for the warm-up (epoch 0),
    # then the same all-parameters phase (rate and length), numbered as the retrofit's.
    retrofit_run = runs[-1]
    assert (retrofit_run["epochs"], retrofit_run["warmup_epochs"]) == (epochs, 1)
    assert retrofit_run["lr"] == 0.02 and retrofit_run["finetune_lr"] == 0.005
    if original_epochs:
        assert len(runs) == 2
        assert (runs[0]["epochs"], runs[0]["warmup_epochs"]) == (original_epochs, 0)
        assert runs[0]["lr"] == runs[0]["finetune_lr"] == 0.005
        assert result.reference.accuracy is not None
        assert result.reference.accuracy["best_epoch"] in (0, 2)
    else:
        assert len(runs) == 1
        assert result.reference.accuracy is not None
        assert result.reference.accuracy["best_epoch"] == 0


@pytest.mark.parametrize(("tuned_top1", "reported_epoch"), [(0.0, 0), (1.0, 3)])
def test_the_original_reports_its_best_of_as_is_and_the_tuned_epochs(
    tinynet: ModuleType,
    sweep_images: Path,
    monkeypatch: pytest.MonkeyPatch,
    tuned_top1: float,
    reported_epoch: int,
) -> None:
    """Its as-is score stands for the warm-up epochs; the tuned epochs are numbered after them."""

    class Best:
        val_top1, val_top5, val_loss = tuned_top1, 1.0, 0.5

    class Tuned:
        best, best_epoch = Best(), 1

    monkeypatch.setattr(sweep_run, "finetune", lambda *args, **kwargs: Tuned())
    training = {"epochs": 3, "warmup_epochs": 2, "batch_size": 8, "device": "cpu"}
    result = sweep(
        tiny(tinynet, num_classes=3),
        "features.0",
        groups=[2],
        input_size=SIZE,
        data=sweep_images,
        training=training,
    )
    accuracy = result.reference.accuracy
    assert accuracy is not None and accuracy["best_epoch"] == reported_epoch
    if reported_epoch:
        assert accuracy["top1"] == tuned_top1
    else:  # as it is, at least as good as 0.0: the earlier epoch wins a tie
        assert accuracy["top1"] >= tuned_top1 and accuracy["loss"] != 0.5
