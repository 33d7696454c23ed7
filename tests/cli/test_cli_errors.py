"""Expected failures of the real ``ulsam-inject`` script, each in a subprocess.

Every case must exit with its code (2 for usage and input errors), print exactly one line on
stderr (``error: ...`` with what was wrong) and nothing on stdout, show no traceback, and
write nothing: neither in the working folder nor next to the input files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    TINY_SIZE,
    TINY_SPEC,
    assert_one_line_error,
    run_cli,
    snapshot,
    subprocess_env,
    tiny_importable,
    write_tiny_module,
)
from safetensors.torch import save_file

# Each test starts the real script in a subprocess (torch imported anew each time).
pytestmark = pytest.mark.slow

SIZE = ("--input-size", TINY_SIZE)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input files for the failures: the tiny model's module, checkpoints good and bad."""
    folder = tmp_path_factory.mktemp("inputs")
    write_tiny_module(folder)
    with tiny_importable(folder) as tinynet:
        torch.manual_seed(0)
        model = tinynet.tiny()
        state = model.state_dict()
        torch.save(state, folder / "good.pt")
        torch.save(model, folder / "whole.pt")  # a pickled nn.Module: code, not just weights
        keys = dict(state)
        keys["extra.weight"] = keys.pop("head.weight")
        torch.save(keys, folder / "keys.pt")
        shapes = dict(state)
        shapes["head.weight"] = torch.zeros(5, 16)
        torch.save(shapes, folder / "shape.pt")
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "good.safetensors"))

        from ulsam_inject import inject, save

        result = inject(model, at="features.0", input_size=(3, 32, 32))
        save(result, folder / "art.safetensors", source=TINY_SPEC)
        save(result, folder / "art.pt", source=TINY_SPEC)
    (folder / "empty.pt").write_bytes(b"")
    (folder / "garbage.pt").write_bytes(b"this is not a checkpoint at all\n" * 4)
    for name in ("good.pt", "good.safetensors", "art.safetensors", "art.pt"):
        data = (folder / name).read_bytes()
        stem, suffix = name.split(".")
        (folder / f"{stem}_trunc.{suffix}").write_bytes(data[: len(data) // 2])
    (folder / "adir").mkdir()
    return folder


# (id, arguments ({ws}: the input folder), exit code, fragments of the one stderr line,
#  files made in the working folder first). Arguments that write (--out) write into the
# working folder, which must hold the same files afterwards.
CASES = [
    # model specs
    ("unknown-module", ["stages", "nosuch_pkg.models:net"], 2, ["nosuch_pkg"], {}),
    (
        "unknown-torchvision",
        ["count", "torchvision:mobilenet_v9"],
        2,
        ["mobilenet_v9", "did you mean mobilenet_v2"],
        {},
    ),
    ("no-source", ["stages", "mobilenet_v2"], 2, ["'torchvision:mobilenet_v2'"], {}),
    ("unknown-timm", ["stages", "timm:nosuchnet_xyz"], 2, ["nosuchnet_xyz", "timm"], {}),
    ("kwargs-not-json", ["stages", TINY_SPEC, "--model-kwargs", "{bad"], 2, ["--model-kwargs"], {}),
    (
        "kwargs-rejected",
        ["count", TINY_SPEC, "--model-kwargs", '{"depth": 3}', *SIZE],
        2,
        ["depth"],
        {},
    ),
    # the command line
    (
        "input-size-malformed",
        ["stages", TINY_SPEC, "--input-size", "64x"],
        2,
        ["input size", "'64x'", "HxW"],
        {},
    ),
    ("missing-at", ["inject", TINY_SPEC, *SIZE], 2, ["--at"], {}),
    ("unknown-option", ["inject", TINY_SPEC, "--at", "0", "--bogus"], 2, ["--bogus"], {}),
    ("bench-batch-zero", ["bench", TINY_SPEC, "--at", "0", "--batch", "0"], 2, ["--batch"], {}),
    # positions, g, modes (after the model is built: --out must stay unwritten)
    (
        "position-out-of-range",
        ["inject", TINY_SPEC, "--at", "0,7", *SIZE, "--out", "x.safetensors"],
        2,
        ["7", "0..2"],
        {},
    ),
    (
        "groups-not-dividing",
        ["inject", TINY_SPEC, "--at", "0", "--groups", "3", *SIZE, "--out", "x.safetensors"],
        2,
        ["3", "features.0", "1, 2, 4, 8"],
        {},
    ),
    (
        "groups-zero-at-position",
        ["bench", TINY_SPEC, "--at", "0", "--groups", "features.0=0"],
        2,
        ["features.0=0", "positive"],
        {},
    ),
    (
        "init-unknown",
        ["inject", TINY_SPEC, "--at", "0", "--init", "zeros", *SIZE, "--out", "x.safetensors"],
        2,
        ["init 'zeros'", "default, uniform"],
        {},
    ),
    ("bench-init-unknown", ["bench", TINY_SPEC, "--at", "0", "--init", "3"], 2, ["init '3'"], {}),
    (
        "mode-unknown",
        ["inject", TINY_SPEC, "--at", "0", "--mode", "sideways"],
        2,
        ["sideways", "replace"],
        {},
    ),
    (
        "replace-changes-shape",
        ["inject", TINY_SPEC, "--at", "1", "--mode", "replace", *SIZE, "--out", "x.pt"],
        2,
        ["features.1"],
        {},
    ),
    # not the input's fault: exit code 1, still one line
    (
        "model-cannot-run",
        ["count", "tinynet:broken", *SIZE],
        1,
        ["RuntimeError", "[-1, 7, 13]"],
        {},
    ),
    # checkpoints given with --checkpoint
    (
        "checkpoint-missing",
        ["count", TINY_SPEC, "--checkpoint", "{ws}/nope.pt", *SIZE],
        2,
        ["nope.pt", "does not exist"],
        {},
    ),
    (
        "checkpoint-empty",
        ["count", TINY_SPEC, "--checkpoint", "{ws}/empty.pt", *SIZE],
        2,
        ["empty.pt", "empty"],
        {},
    ),
    (
        "checkpoint-corrupt",
        ["stages", TINY_SPEC, "-c", "{ws}/garbage.pt", *SIZE],
        2,
        ["garbage.pt", "corrupt"],
        {},
    ),
    (
        "checkpoint-truncated-pt",
        ["count", TINY_SPEC, "-c", "{ws}/good_trunc.pt", *SIZE],
        2,
        ["good_trunc.pt", "truncated"],
        {},
    ),
    (
        "checkpoint-truncated-safetensors",
        ["count", TINY_SPEC, "-c", "{ws}/good_trunc.safetensors", *SIZE],
        2,
        ["good_trunc.safetensors", "truncated"],
        {},
    ),
    (
        "checkpoint-directory",
        ["count", TINY_SPEC, "-c", "{ws}/adir", *SIZE],
        2,
        ["adir", "directory"],
        {},
    ),
    (
        "checkpoint-wrong-keys",
        ["inject", TINY_SPEC, "-c", "{ws}/keys.pt", "--at", "0", *SIZE, "--out", "x.safetensors"],
        2,
        ["keys.pt: checkpoint does not fit", "1 missing key", "head.weight", "extra.weight"],
        {},
    ),
    (
        "checkpoint-wrong-shape",
        ["count", TINY_SPEC, "-c", "{ws}/shape.pt", *SIZE],
        2,
        ["shape.pt: checkpoint does not fit", "head.weight", "(5, 16)", "(10, 16)"],
        {},
    ),
    (
        "checkpoint-pickled-module",
        ["count", TINY_SPEC, "-c", "{ws}/whole.pt", *SIZE],
        2,
        ["whole.pt", "pickled", "--trust-checkpoint"],
        {},
    ),
    # MODEL given as a file
    ("model-file-missing", ["count", "{ws}/nope.safetensors"], 2, ["does not exist"], {}),
    ("model-file-directory", ["stages", "{ws}/adir"], 2, ["adir", "directory"], {}),
    ("model-file-empty", ["count", "{ws}/empty.pt"], 2, ["empty.pt", "empty"], {}),
    (
        "model-file-plain-checkpoint",
        ["count", "{ws}/good.safetensors"],
        2,
        ["good.safetensors", "--checkpoint"],
        {},
    ),
    (
        "model-file-truncated-safetensors",
        ["count", "{ws}/art_trunc.safetensors"],
        2,
        ["art_trunc.safetensors", "truncated"],
        {},
    ),
    ("model-file-truncated-pt", ["stages", "{ws}/art_trunc.pt"], 2, ["art_trunc.pt"], {}),
    (
        "model-file-with-checkpoint",
        ["count", "{ws}/art.safetensors", "--checkpoint", "{ws}/good.pt"],
        2,
        ["--checkpoint"],
        {},
    ),
    (
        "model-file-reinjected",
        ["inject", "{ws}/art.pt", "--at", "2", "--out", "x.safetensors"],
        2,
        ["already retrofitted", TINY_SPEC],
        {},
    ),
    # outputs
    (
        "output-exists",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "taken.safetensors"],
        2,
        ["taken.safetensors", "exists", "--force"],
        {"taken.safetensors": b"someone else's file"},
    ),
    (
        "output-folder-missing",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "nodir/x.safetensors"],
        2,
        ["nodir", "does not exist"],
        {},
    ),
    (
        "output-folder-is-a-file",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--export", "afile/x.pt2"],
        2,
        ["afile", "not a folder"],
        {"afile": b"a file where a folder should be"},
    ),
    (
        "output-is-a-directory",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "{ws}/adir"],
        2,
        ["adir", "directory"],
        {},
    ),
    (
        "output-is-the-checkpoint",
        [
            "inject",
            TINY_SPEC,
            "-c",
            "{ws}/good.pt",
            "--at",
            "0",
            "--out",
            "{ws}/good.pt",
            "--force",
        ],
        2,
        ["good.pt", "input checkpoint"],
        {},
    ),
    (
        "export-format",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--dry-run", "--export", "x.bin"],
        2,
        ["x.bin", ".pt2 or .onnx"],
        {},
    ),
    (
        "same-file-twice",
        ["inject", TINY_SPEC, "--at", "0", "--out", "x.pt", "--export", "./x.pt"],
        2,
        ["different files"],
        {},
    ),
    (
        "plot-format-after-out",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "x.safetensors", "--plot", "x.jpg"],
        2,
        ["x.jpg", ".png"],
        {},
    ),
]


@pytest.mark.parametrize(
    ("args", "code", "fragments", "setup"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_expected_failure_is_one_line_and_writes_nothing(
    ws: Path,
    tmp_path: Path,
    args: list[str],
    code: int,
    fragments: list[str],
    setup: dict[str, bytes],
) -> None:
    for name, data in setup.items():
        (tmp_path / name).write_bytes(data)
    before_cwd, before_ws = snapshot(tmp_path), snapshot(ws)
    argv = [arg.replace("{ws}", str(ws)) for arg in args]
    result = run_cli(*argv, cwd=tmp_path, pythonpath=ws)
    assert_one_line_error(result, code, *fragments)
    assert snapshot(tmp_path) == before_cwd  # nothing written, nothing left half-written
    assert snapshot(ws) == before_ws  # inputs untouched, nothing written beside them


def test_position_inside_an_untraceable_leaf_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    # mobilevit_xxs: its transformer blocks (stages.2.1, ...) branch on tensor values and
    # become leaves; a position inside one cannot be placed.
    result = run_cli(
        "inject",
        "timm:mobilevit_xxs",
        "--input-size",
        "64",
        "--at",
        "stages.1.0,stages.2.1.conv_kxk",
        "--out",
        "x.safetensors",
        cwd=tmp_path,
    )
    assert_one_line_error(result, 2, "stages.2.1.conv_kxk", "'stages.2.1'", "leaf")
    assert snapshot(tmp_path) == {}


def test_timm_spec_without_timm_says_how_to_install(tmp_path: Path) -> None:
    # timm "not installed": a None entry in sys.modules makes `import timm` fail with
    # ModuleNotFoundError(name="timm"), as an absent package does.
    launcher = (
        "import sys; sys.modules['timm'] = None; from ulsam_inject.cli.app import main; main()"
    )
    result = run_cli(
        "stages",
        "timm:mobilenetv3_small_050",
        cwd=tmp_path,
        command=[sys.executable, "-c", launcher],
    )
    assert_one_line_error(result, 2, "timm", "pip install")


def test_onnx_export_without_the_extra_says_how_to_install(tmp_path: Path) -> None:
    # onnxscript "not installed" (a None entry in sys.modules): refused before any work.
    launcher = (
        "import sys; sys.modules['onnxscript'] = None; "
        "from ulsam_inject.cli.app import main; main()"
    )
    result = run_cli(
        "inject",
        "torchvision:mobilenet_v2",
        "--at",
        "13",
        "--input-size",
        "64",
        "--export",
        "m.onnx",
        cwd=tmp_path,
        command=[sys.executable, "-c", launcher],
    )
    assert_one_line_error(result, 2, "onnxscript", "pip install 'ulsam-inject[onnx]'")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_and_keeps_the_exit_code(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "inject", TINY_SPEC, "--at", "7", *SIZE, "--debug", cwd=tmp_path, pythonpath=ws
    )
    assert result.code == 2
    assert "Traceback" in result.stderr
    assert "PositionError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: stage index 7")


def test_pretrained_without_network_fails_in_one_line(tmp_path: Path) -> None:
    # This machine has no network: the fetch fails, in one line, with exit code 1. The
    # weights cache points into tmp_path so that nothing lands in the user's cache; a
    # network that hangs instead of refusing makes the test skip rather than wait.
    env = subprocess_env(TORCH_HOME=str(tmp_path / "torch-home"))
    try:
        result = run_cli(
            "stages",
            "torchvision:mobilenet_v2",
            "--pretrained",
            "--input-size",
            "64",
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("fetching pretrained weights neither failed nor finished within 60 s")
    if result.code == 0:
        pytest.skip("this machine reached the network and fetched the weights")
    assert_one_line_error(result, 1, "pretrained", "torchvision:mobilenet_v2", "--checkpoint")
    cached = [p for p in (tmp_path / "torch-home").rglob("*") if p.is_file()]
    assert cached == []  # no partial download left behind
