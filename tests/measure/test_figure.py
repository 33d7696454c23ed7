"""The retrofit figure: per-stage numbers consistent with the report; files written safely."""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ulsam_inject.measure.figure as figure_module
from ulsam_inject import Retrofit, inject
from ulsam_inject.errors import MissingDependencyError, OutputError, WriteError
from ulsam_inject.measure.figure import plot_retrofit, stage_breakdown
from ulsam_inject.surgery.report import human

pytest.importorskip("matplotlib")

SIZE = (3, 64, 64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AFTER = ("features.13", "features.16")
REPLACED = "features.12"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def retrofit(mnv2: nn.Module) -> Retrofit:
    return inject(
        mnv2,
        at=[REPLACED, *AFTER],
        mode={REPLACED: "replace"},
        groups=4,
        input_size=SIZE,
    ).with_source("torchvision:mobilenet_v2")


@pytest.fixture(scope="module")
def macs_only(mnv2: nn.Module, retrofit: Retrofit) -> dict[str, Any]:
    return stage_breakdown(mnv2, retrofit, latency=False)


def test_breakdown_macs_agree_with_the_report(
    retrofit: Retrofit, macs_only: dict[str, Any]
) -> None:
    data, report = macs_only, retrofit.report
    assert report is not None
    names = data["stages"]
    assert names == [s.name for s in retrofit.stages]
    for key in ("macs_before", "macs_after", "macs_block"):
        assert len(data[key]) == len(names)
    assert data["time_before"] == data["time_after"] == data["time_block"] == []
    assert data["total_macs_before"] == report.before["macs"]
    assert data["total_macs_after"] == report.after["macs"]
    assert data["total_params_before"] == report.before["params"]
    assert data["total_params_after"] == report.after["params"]
    # The stages hold most of the MACs; the rest (stem, head) is the same before and after.
    outside = report.before["macs"] - sum(data["macs_before"])
    assert 0 < outside < report.before["macs"]
    assert report.after["macs"] - sum(data["macs_after"]) - sum(data["macs_block"]) == outside
    # Per stage: after = before unless replaced (then 0); blocks cost 2CHW and match the report.
    blocks = {b.stage: b for b in report.blocks}
    for i, name in enumerate(names):
        if name == REPLACED:
            assert data["macs_after"][i] == 0
        else:
            assert data["macs_after"][i] == data["macs_before"][i]
        if name in blocks:
            block = blocks[name]
            assert data["macs_block"][i] == 2 * block.channels * block.height * block.width
            own = data["macs_block"][i] - (data["macs_before"][i] if name == REPLACED else 0)
            assert own == block.macs
        else:
            assert data["macs_block"][i] == 0


@pytest.mark.slow  # times every node of two MobileNetV2s
def test_breakdown_latency_shares(mnv2: nn.Module, retrofit: Retrofit) -> None:
    data = stage_breakdown(mnv2, retrofit, repeats=1)
    names = data["stages"]
    for key in ("time_before", "time_after", "time_block"):
        assert len(data[key]) == len(names)
        assert all(0.0 <= v <= 1.0 for v in data[key])
    assert 0 < sum(data["time_before"]) <= 1.0
    assert 0 < sum(data["time_after"]) + sum(data["time_block"]) <= 1.0
    for i, name in enumerate(names):
        placed = name in (REPLACED, *AFTER)
        assert (data["time_block"][i] > 0) == placed
        if name == REPLACED:
            assert data["time_after"][i] == 0.0
        else:
            assert data["time_after"][i] > 0


def leftovers(folder: Path, keep: str) -> list[str]:
    return [name for name in os.listdir(folder) if name != keep]


def test_png_is_written(mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path) -> None:
    target = tmp_path / "mnv2.png"
    assert plot_retrofit(mnv2, retrofit, target, latency=False) == target.resolve()
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert leftovers(tmp_path, "mnv2.png") == []


@pytest.mark.slow  # times every node of two MobileNetV2s
def test_svg_with_latency_is_written(mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path) -> None:
    target = tmp_path / "mnv2.SVG"  # the suffix is matched case-insensitively
    plot_retrofit(mnv2, retrofit, str(target), repeats=1)
    root = ET.parse(target).getroot()
    assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg")
    assert leftovers(tmp_path, "mnv2.SVG") == []


def test_an_existing_file_is_kept_without_force(
    mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "figure.png"
    target.write_bytes(b"precious")

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("profiled before checking the output")

    with monkeypatch.context() as patch:
        patch.setattr(figure_module, "stage_breakdown", no_work)
        with pytest.raises(OutputError, match="exists"):
            plot_retrofit(mnv2, retrofit, target, latency=False)
    assert target.read_bytes() == b"precious"
    assert leftovers(tmp_path, "figure.png") == []
    plot_retrofit(mnv2, retrofit, target, latency=False, force=True)
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert leftovers(tmp_path, "figure.png") == []


@pytest.mark.parametrize("name", ["figure.jpg", "figure.pdf", "figure", "figure.png.txt"])
def test_bad_suffix_is_refused(
    mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path, name: str
) -> None:
    with pytest.raises(OutputError, match=r"\.png or \.svg"):
        plot_retrofit(mnv2, retrofit, tmp_path / name, latency=False)
    assert os.listdir(tmp_path) == []


def test_a_failing_writer_leaves_nothing(
    mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    def half_written(self: Figure, path: Any, **kwargs: object) -> None:
        Path(path).write_bytes(PNG_MAGIC)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    # The writer's OSError becomes one typed error (exit code 1 in the CLI).
    with pytest.raises(WriteError, match="disk full"):
        plot_retrofit(mnv2, retrofit, tmp_path / "figure.png", latency=False)
    assert os.listdir(tmp_path) == []


def test_missing_matplotlib_is_a_clear_error(
    mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="matplotlib"):
        plot_retrofit(mnv2, retrofit, tmp_path / "figure.png", latency=False)
    assert os.listdir(tmp_path) == []


def test_plotting_changes_neither_model(
    mnv2: nn.Module, retrofit: Retrofit, tmp_path: Path
) -> None:
    original = mnv2.train()
    try:
        flags = [m.training for m in original.modules()]
        state = {k: v.clone() for k, v in original.state_dict().items()}
        new_state = {k: v.clone() for k, v in retrofit.model.state_dict().items()}
        retrofit.model.train()
        plot_retrofit(original, retrofit, tmp_path / "f.png", repeats=1)
        assert [m.training for m in original.modules()] == flags
        assert all(m.training for m in retrofit.model.modules())
        for key, value in original.state_dict().items():
            assert torch.equal(value, state[key]), key
        for key, value in retrofit.model.state_dict().items():
            assert torch.equal(value, new_state[key]), key
    finally:
        original.eval()
        retrofit.model.eval()


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (999, "999"), (37632, "37.6K"), (-22654464, "-22.7M"), (999_600, "1.00M")],
)
def test_short_numbers_in_labels(value: int, text: str) -> None:
    assert human(value, significant=True) == text
