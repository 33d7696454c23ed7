"""The injection report: per-block deltas, totals, JSON schema, rich rendering, dry run."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console
from torch import nn

import ulsam_inject.surgery.report as report_module
from ulsam_inject import count, find_stages, inject, trace_model
from ulsam_inject.cli.app import main
from ulsam_inject.surgery.report import SCHEMA, TOTAL_KEYS, Report, human, render_report, signed

SMALL = (3, 64, 64)
FULL = (3, 224, 224)
BLOCK_KEYS = {"stage", "mode", "channels", "groups", "height", "width", "params", "macs"}


pytestmark = pytest.mark.usefixtures("one_thread")


def block_deltas(report: Report) -> dict[str, int]:
    return {
        "params": sum(b.params for b in report.blocks),
        "macs": sum(b.macs for b in report.blocks),
        "other_ops": sum(b.other_ops for b in report.blocks),
        "bytes": sum(b.bytes for b in report.blocks),
    }


def total_deltas(report: Report) -> dict[str, int]:
    delta = {key: report.after[key] - report.before[key] for key in TOTAL_KEYS}
    return {
        "params": delta["params"],
        "macs": delta["macs"],
        "other_ops": delta["other_ops"],
        "bytes": delta["bytes_read"] + delta["bytes_written"],
    }


# -- the paper's numbers ---------------------------------------------------------------


@pytest.mark.parametrize("stage", ["features.12", "features.13"])
def test_replacing_a_96_channel_block_saves_about_22_7m_macs(mnv2: nn.Module, stage: str) -> None:
    report = inject(mnv2, at=stage, mode="replace", groups=4, input_size=FULL).report
    assert report is not None
    (block,) = report.blocks
    assert (block.stage, block.mode, block.channels, block.height, block.width, block.groups) == (
        stage,
        "replace",
        96,
        14,
        14,
        4,
    )
    assert block.macs == pytest.approx(-22.7e6, abs=0.05e6)
    # Exactly: ULSAM's 2CHW minus the removed stage's MACs; 5C + 3g minus its params.
    traced = trace_model(mnv2, FULL)
    removed = next(s for s in find_stages(traced) if s.name == stage)
    removed_cost = count(traced).for_nodes(removed.nodes)
    assert block.macs == 2 * 96 * 14 * 14 - removed_cost.macs
    removed_params = sum(p.numel() for p in mnv2.get_submodule(stage).parameters())
    assert block.params == 5 * 96 + 3 * 4 - removed_params
    assert report.after["macs"] - report.before["macs"] == block.macs


@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16, 32])
def test_an_inserted_block_adds_2chw_macs_and_5c_plus_3g_params(
    mnv2: nn.Module, groups: int
) -> None:
    report = inject(mnv2, at="features.13", groups=groups, input_size=FULL).report
    assert report is not None
    (block,) = report.blocks
    c, h, w = block.channels, block.height, block.width
    assert (c, h, w, block.groups, block.mode) == (96, 14, 14, groups, "after")
    assert block.macs == 2 * c * h * w  # whatever g is
    assert block.params == 5 * c + 3 * groups
    assert block.to_dict()["flops"] == 2 * block.macs
    assert block.other_ops > 0 and block.bytes > 0
    assert report.after["params"] - report.before["params"] == 5 * c + 3 * groups


# -- consistency: totals after - before == the sum of the blocks' deltas ------------------


PLANS = {
    "after": {"at": ["features.13", "features.16"]},
    "replace": {"at": ["features.12", "features.15"], "mode": "replace"},
    "mixed": {
        "at": ["features.5", "features.12", "features.13", "features.16"],
        "mode": {"features.12": "replace", "features.5": "replace"},
    },
}


@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_total_change_is_the_sum_of_block_deltas(mnv2: nn.Module, plan: str, groups: int) -> None:
    report = inject(mnv2, groups=groups, input_size=SMALL, **PLANS[plan]).report
    assert report is not None
    assert len(report.blocks) == len(PLANS[plan]["at"])
    assert total_deltas(report) == block_deltas(report)
    assert report.after["flops"] - report.before["flops"] == 2 * block_deltas(report)["macs"]
    # Every parameter is trainable, before and after.
    assert (
        report.after["trainable_params"] - report.before["trainable_params"]
        == (block_deltas(report)["params"])
    )
    modes = {b.stage: b.mode for b in report.blocks}
    if plan == "mixed":
        assert modes == {
            "features.5": "replace",
            "features.12": "replace",
            "features.13": "after",
            "features.16": "after",
        }
    for block in report.blocks:
        assert block.groups == groups
        if block.mode == "after":
            assert block.macs == 2 * block.channels * block.height * block.width
            assert block.params == 5 * block.channels + 3 * groups
        else:
            assert block.macs < 0 and block.params < 0


def test_mixed_g_per_position(mnv2: nn.Module) -> None:
    report = inject(
        mnv2,
        at=["features.13", "features.16"],
        groups={"features.13": 8, "features.16": 2},
        input_size=SMALL,
    ).report
    assert report is not None
    assert [(b.stage, b.groups) for b in report.blocks] == [("features.13", 8), ("features.16", 2)]
    assert total_deltas(report) == block_deltas(report)


def test_blocks_are_in_execution_order_with_positions(mnv2: nn.Module) -> None:
    report = inject(mnv2, at=["features.16", "features.3"], input_size=SMALL).report
    assert report is not None
    assert [(b.index, b.stage) for b in report.blocks] == [(2, "features.3"), (15, "features.16")]
    assert [b.module for b in report.blocks] == ["features.3.ulsam", "features.16.ulsam"]
    assert [b.rewrite for b in report.blocks] == ["stage", "stage"]


def test_no_report_when_not_asked(mnv2: nn.Module) -> None:
    assert inject(mnv2, at="features.13", input_size=SMALL, report=False).report is None


def test_the_report_counts_the_models_it_describes(mnv2: nn.Module) -> None:
    result = inject(
        mnv2, at=["features.12", "features.13"], mode={"12": "replace"}, input_size=SMALL
    )
    report = result.report
    assert report is not None
    before, after = count(mnv2, SMALL), count(result.model, SMALL)
    assert (report.before["params"], report.before["macs"]) == (before.params, before.macs)
    assert (report.after["params"], report.after["macs"]) == (after.params, after.macs)
    assert report.after["other_ops"] == after.other_ops


# -- the JSON document --------------------------------------------------------------------


def test_json_document_follows_the_versioned_schema(mnv2: nn.Module) -> None:
    result = inject(
        mnv2, at=["features.12", "features.16"], mode={"features.12": "replace"}, input_size=SMALL
    ).with_source("torchvision:mobilenet_v2")
    assert result.report is not None
    document = json.loads(json.dumps(result.report.to_dict()))
    assert document["schema"] == SCHEMA == "ulsam-inject.report/1"
    assert document["model"] == "torchvision:mobilenet_v2"
    assert document["input_size"] == list(SMALL)
    for side in ("before", "after"):
        assert set(document[side]) == set(TOTAL_KEYS)
        for value in document[side].values():
            assert isinstance(value, int) and not isinstance(value, bool)
    for key, change in document["change"].items():
        assert change["delta"] == document["after"][key] - document["before"][key]
        expected = 100 * change["delta"] / document["before"][key]
        assert change["percent"] == pytest.approx(expected, abs=1e-4)
    assert [b["stage"] for b in document["blocks"]] == ["features.12", "features.16"]
    for block in document["blocks"]:
        assert set(block) >= BLOCK_KEYS
        for key in BLOCK_KEYS - {"stage", "mode"}:
            assert isinstance(block[key], int) and not isinstance(block[key], bool)
        assert block["flops"] == 2 * block["macs"]
    assert [b["mode"] for b in document["blocks"]] == ["replace", "after"]
    assert set(document["units"]) >= {"params", "macs", "flops", "other_ops", "bytes"}
    assert document["uncounted"] == []


def test_every_json_key_is_documented_in_the_schema() -> None:
    doc = report_module.__doc__ or ""
    report = Report(
        model=None,
        input_size=SMALL,
        before=dict.fromkeys(TOTAL_KEYS, 1),
        after=dict.fromkeys(TOTAL_KEYS, 2),
        blocks=(),
        uncounted=(),
    )
    document = report.to_dict()
    for key in document:
        assert f'"{key}"' in doc, key
    for key in TOTAL_KEYS:
        assert f'"{key}"' in doc, key
    block_doc = doc[doc.index('"blocks"') :]
    for key in report_module.BlockCost("s", 0, "after", "m", 8, 4, 2, 2, 1, 1, 1, 1).to_dict():
        assert f'"{key}"' in block_doc, key


def test_change_of_a_total_that_was_zero() -> None:
    report = Report(None, SMALL, {"macs": 0}, {"macs": 5}, (), ())
    assert report.change("macs") == (5, 0.0)
    report = Report(None, SMALL, {"macs": 200}, {"macs": 150}, (), ())
    assert report.change("macs") == (-50, -25.0)


# -- rendering ----------------------------------------------------------------------------


def rendered(report: Report, **kwargs: bool) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(render_report(report, **kwargs))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_rich_tables_show_blocks_and_totals(mnv2: nn.Module) -> None:
    report = inject(
        mnv2, at=["features.12", "features.13"], mode={"features.12": "replace"}, input_size=SMALL
    ).report
    assert report is not None
    text = rendered(report)
    assert "ULSAM blocks" in text and "dry run" not in text
    for header in ("stage", "mode", "C x H x W", "params", "MACs", "other ops", "bytes"):
        assert header in text
    assert "features.12" in text and "replace" in text
    assert "features.13" in text and "after" in text
    assert "96x4x4" in text  # C x H x W at 64x64
    macs_delta, percent = report.change("macs")
    assert signed(macs_delta) in text and f"{percent:+.3f}%" in text
    assert human(report.before["macs"]) in text and human(report.after["macs"]) in text
    assert "FLOPs (2 x MACs)" in text
    assert "dry run: nothing written" in rendered(report, dry_run=True)


def test_uncounted_ops_are_listed_never_hidden() -> None:
    report = Report(
        None, SMALL, dict.fromkeys(TOTAL_KEYS, 1), dict.fromkeys(TOTAL_KEYS, 1), (), ("my_op",)
    )
    assert "my_op" in rendered(report)
    assert report.to_dict()["uncounted"] == ["my_op"]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (999, "999"),
        (37632, "37.632K"),
        (-22654464, "-22.654M"),
        (3.5e9, "3.500G"),
        (2e12, "2.000T"),
    ],
)
def test_human_numbers(value: float, text: str) -> None:
    assert human(value) == text


def test_signed_numbers() -> None:
    assert signed(1500) == "+1.500K"
    assert signed(-1500, "B") == "-1.500KB"
    assert signed(0) == "0"


# -- dry run: the whole report, nothing written -------------------------------------------


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_dry_run_prints_the_whole_report_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["inject", "torchvision:mobilenet_v2", "--at", "features.12,features.13"]
    args += ["--mode", "features.12=replace", "--input-size", "64", "--dry-run"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    assert document["dry_run"] is True and document["written"] == []
    assert document["schema"] == SCHEMA
    assert [(b["stage"], b["mode"]) for b in document["blocks"]] == [
        ("features.12", "replace"),
        ("features.13", "after"),
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "dry run: nothing written" in out
    assert "features.12" in out and "Totals" in out
    assert listing(tmp_path) == []


def test_dry_run_takes_outputs_and_writes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["inject", "torchvision:mobilenet_v2", "--at", "13", "--input-size", "64"]
    args += ["--dry-run", "--out", "m.safetensors", "--export", "m.pt2", "--json"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    document = json.loads(out)
    expected = [str(tmp_path.resolve() / n) for n in ("m.safetensors", "m.pt2")]
    assert document["would_write"] == expected and document["written"] == []
    assert listing(tmp_path) == []
