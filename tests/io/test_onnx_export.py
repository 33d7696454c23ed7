"""ONNX export (onnx_export.py) and the dynamic batch of exported programs, on MobileNetV2.

One retrofit is injected and exported once per module (ONNX export takes seconds), with
every warning recorded: nothing may leak to the user from tracing or exporting the block.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot
from torch import nn

from ulsam_inject import Retrofit, export_onnx, export_program, inject
from ulsam_inject.errors import InputSizeError, MissingDependencyError, OutputError
from ulsam_inject.io.onnx_export import ONNX_OPSET

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZE = (3, 64, 64)


@dataclass
class Exported:
    retrofit: Retrofit
    folder: Path
    onnx_path: Path
    pt2_path: Path
    warnings: list[warnings.WarningMessage]


def calibrate(model: nn.Module) -> None:
    """Batch-norm statistics from random images, as after training: a weightless MobileNetV2
    with default statistics outputs about 1e-9, which any tolerance would accept."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(torch.randn(8, *SIZE, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def exported(mnv2: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    folder = tmp_path_factory.mktemp("onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        retrofit = inject(mnv2, at="features.13,features.16", input_size=SIZE, report=False)
        calibrate(retrofit.model)  # leaves it in train mode: exported in eval, flags restored
        onnx_path = export_onnx(retrofit, folder / "m.onnx")
        pt2_path = export_program(retrofit, folder / "m.pt2")
    assert retrofit.model.training
    retrofit.model.eval()
    return Exported(retrofit, folder, onnx_path, pt2_path, list(caught))


def test_no_warning_leaks_from_inject_or_export(exported: Exported) -> None:
    found = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in exported.warnings
    ]
    assert found == []


def test_onnx_runs_in_onnxruntime_at_any_batch(exported: Exported) -> None:
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "input" and given.shape[1:] == list(SIZE)
    assert isinstance(given.shape[0], str)  # symbolic: the batch is dynamic
    for batch in (1, 4):
        x = torch.randn(batch, *SIZE)
        (y,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = exported.retrofit.model(x)
        assert expected.abs().max() > 0.1  # outputs large enough for the tolerance to matter
        torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)


def test_onnx_graph_holds_only_standard_ops(exported: Exported) -> None:
    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model)
    assert {(o.domain or "ai.onnx", o.version) for o in model.opset_import} == {
        ("ai.onnx", ONNX_OPSET)
    }
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert not model.functions  # no local functions standing in for custom ops
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "MaxPool", "Softmax", "Relu"} <= ops
    assert sorted(snapshot(exported.folder)) == ["m.onnx", "m.pt2"]  # no temporary files


def test_exported_program_takes_batches_1_and_8(exported: Exported) -> None:
    program = torch.export.load(exported.pt2_path).module()
    for batch in (1, 8):
        x = torch.randn(batch, *SIZE)
        with torch.no_grad():
            torch.testing.assert_close(program(x), exported.retrofit.model(x), rtol=1e-5, atol=1e-5)


def test_existing_file_is_kept_without_force(exported: Exported) -> None:
    before = exported.onnx_path.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        export_onnx(exported.retrofit, exported.onnx_path)
    assert exported.onnx_path.read_bytes() == before


def test_plain_module_needs_an_input_size(mnv2: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(InputSizeError, match=r"input_size=\(C, H, W\)"):
        export_onnx(mnv2, tmp_path / "m.onnx")
    assert snapshot(tmp_path) == {}


def test_missing_exporter_is_one_clear_error(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(
        MissingDependencyError, match=r"onnxscript: pip install 'ulsam-inject\[onnx\]'"
    ):
        export_onnx(exported.retrofit, tmp_path / "m.onnx")
    assert snapshot(tmp_path) == {}
