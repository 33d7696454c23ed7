"""The ``ulsam-inject`` commands as users run them: the real script, in a subprocess.

Each run pays a Python start with torch, so the models are small: torchvision's
MobileNetV2 at 64x64 (built without weights) and ``tinynet:tiny`` (cli_helpers) at 32x32.
When stderr is not a terminal the commands print no progress, so a successful ``--json``
run leaves stderr empty.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from cli_helpers import (
    TINY_SIZE,
    TINY_SPEC,
    digest,
    run_cli,
    snapshot,
    tiny_importable,
    write_tiny_module,
)
from safetensors.torch import save_file

# Each test starts the real script in a subprocess (torch imported anew each time).
pytestmark = pytest.mark.slow

SIZE = ("--input-size", TINY_SIZE)
STAGE_KEYS = {
    "index",
    "name",
    "kind",
    "in_channels",
    "out_channels",
    "stride",
    "height",
    "width",
    "residual",
    "replaceable",
}
BLOCK_KEYS = {"stage", "mode", "channels", "groups", "height", "width", "params", "macs"}
TOTAL_KEYS = {"params", "macs", "flops"}


def ulsam_params(channels: int, groups: int) -> int:
    """The README's count: 5C + 3g."""
    return 5 * channels + 3 * groups


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's module and checkpoints of it (4 classes, non-default weights)."""
    folder = tmp_path_factory.mktemp("inputs")
    write_tiny_module(folder)
    with tiny_importable(folder) as tinynet:
        torch.manual_seed(0)
        model = tinynet.tiny(num_classes=4)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.uniform_(0.5, 1.5)
        state = model.state_dict()
        # A training script's checkpoint: wrapped, DataParallel's "module." prefix.
        wrapped = {"module." + k: v for k, v in state.items()}
        torch.save({"epoch": 7, "state_dict": wrapped, "optimizer": {}}, folder / "wrapped.pth")
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "good.safetensors"))
        torch.save(model, folder / "whole.pt")
    return folder


def test_stages_json_lists_the_stages_of_mobilenet_v2(tmp_path: Path) -> None:
    result = run_cli(
        "stages", "torchvision:mobilenet_v2", "--input-size", "64", "--json", cwd=tmp_path
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # no progress when stderr is not a terminal
    document = result.json()
    stages = document["stages"]
    assert [s["name"] for s in stages] == [f"features.{i}" for i in range(1, 18)]
    assert [s["index"] for s in stages] == list(range(17))
    assert all(set(s) == STAGE_KEYS for s in stages)
    by_name = {s["name"]: s for s in stages}
    assert by_name["features.13"] == {
        "index": 12,
        "name": "features.13",
        "kind": "inverted-residual",
        "in_channels": 96,
        "out_channels": 96,
        "stride": 1,
        "height": 4,
        "width": 4,
        "residual": True,
        "replaceable": True,
    }
    assert by_name["features.14"]["stride"] == 2
    assert not by_name["features.14"]["replaceable"]
    assert document["input_size"] == [3, 64, 64]
    assert document["schema"] == "ulsam-inject.stages/1"
    assert document["leaves"] == {}
    assert snapshot(tmp_path) == {}


def test_stages_table_with_a_safetensors_checkpoint(ws: Path, tmp_path: Path) -> None:
    # python -m ulsam_inject: the same CLI as the console script.
    result = run_cli(
        "stages",
        TINY_SPEC,
        "--model-kwargs",
        '{"num_classes": 4}',
        "--checkpoint",
        ws / "good.safetensors",
        *SIZE,
        cwd=tmp_path,
        pythonpath=ws,
        command=[sys.executable, "-m", "ulsam_inject"],
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    assert "3 stages of tinynet:tiny" in result.stdout
    for text in ("replaceable", "features.0", "features.1", "features.2", "16x16", "8x8"):
        assert text in result.stdout
    with pytest.raises(json.JSONDecodeError, match="line 1 column"):
        json.loads(result.stdout)


def test_count_json_matches_torchvision(tmp_path: Path) -> None:
    result = run_cli(
        "count", "torchvision:mobilenet_v2", "--input-size", "64", "--json", cwd=tmp_path
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    document = result.json()
    reference = torchvision.models.mobilenet_v2(weights=None)
    assert document["params"] == sum(p.numel() for p in reference.parameters()) == 3_504_872
    for key in ("params", "macs", "flops", "other_ops", "bytes_read", "bytes_written"):
        assert type(document[key]) is int and document[key] > 0, key
    assert document["flops"] == 2 * document["macs"]
    assert document["schema"] == "ulsam-inject.count/1" and document["leaves"] == {}
    assert document["input_size"] == [3, 64, 64]
    assert len(document["stages"]) == 17


def test_inject_dry_run_json_is_the_report_and_writes_nothing(tmp_path: Path) -> None:
    result = run_cli(
        "inject",
        "torchvision:mobilenet_v2",
        "--at",
        "features.13,features.16",
        "--groups",
        "4",
        "--input-size",
        "64",
        "--dry-run",
        "--json",
        cwd=tmp_path,
    )
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == ["dry run: nothing written"]
    document = result.json()
    assert document["schema"] == "ulsam-inject.report/1"
    assert document["model"] == "torchvision:mobilenet_v2"
    assert document["dry_run"] is True and document["written"] == []
    assert document["would_write"] == []
    for side in ("before", "after"):
        assert set(document[side]) >= TOTAL_KEYS
        assert all(type(document[side][k]) is int for k in TOTAL_KEYS)
    blocks = document["blocks"]
    assert all(set(b) >= BLOCK_KEYS for b in blocks)
    # features.13: 96 channels at 4x4; features.16: 160 channels at 2x2 (64x64 input).
    expected = [("features.13", 96, 4), ("features.16", 160, 2)]
    assert [(b["stage"], b["channels"], b["height"]) for b in blocks] == expected
    for block, (_, channels, side) in zip(blocks, expected):
        assert block["mode"] == "after" and block["groups"] == 4 and block["width"] == side
        assert block["params"] == ulsam_params(channels, 4)
        assert block["macs"] == 2 * channels * side * side
    before, after = document["before"], document["after"]
    assert after["params"] - before["params"] == sum(b["params"] for b in blocks)
    assert after["macs"] - before["macs"] == sum(b["macs"] for b in blocks)
    assert before["params"] == 3_504_872
    assert snapshot(tmp_path) == {}


def test_inject_dry_run_takes_the_real_command_and_says_what_it_would_write(
    ws: Path, tmp_path: Path
) -> None:
    (tmp_path / "m.png").write_bytes(b"an old figure, replaced with --force")
    args = ["inject", TINY_SPEC, "--at", "0,-1", *SIZE, "--out", "m.safetensors"]
    args += ["--export", "m.onnx", "--plot", "m.png", "--force", "--dry-run", "--json"]
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path, pythonpath=ws)
    assert result.code == 0, result.stderr
    folder = tmp_path.resolve()
    names = ("m.safetensors", "m.onnx", "m.png")
    assert result.stderr.splitlines() == [
        *(f"would write {folder / n}" for n in names),
        "dry run: nothing written",
    ]
    document = result.json()
    assert document["dry_run"] is True and document["written"] == []
    assert document["would_write"] == [str(folder / n) for n in names]
    assert document["schema"] == "ulsam-inject.report/1" and len(document["blocks"]) == 2
    assert snapshot(tmp_path) == before
    # The same checks as the real run: without --force the existing figure is refused.
    args.remove("--force")
    refused = run_cli(*args, cwd=tmp_path, pythonpath=ws)
    assert refused.code == 2 and "m.png" in refused.stderr and "--force" in refused.stderr
    assert snapshot(tmp_path) == before


def test_inject_exports_onnx_with_a_dynamic_batch(ws: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    args = ["inject", TINY_SPEC, "--at", "0,-1", *SIZE, "--seed", "3"]
    result = run_cli(
        *args, "--out", "m.safetensors", "--export", "m.onnx", cwd=tmp_path, pythonpath=ws
    )
    assert result.code == 0, result.stderr
    folder = tmp_path.resolve()
    assert result.stderr.splitlines() == [
        f"wrote {folder / n}" for n in ("m.safetensors", "m.onnx")
    ]
    assert sorted(snapshot(tmp_path)) == ["m.onnx", "m.safetensors"]
    from ulsam_inject import load

    with tiny_importable(ws):
        model = load(tmp_path / "m.safetensors", trust_recipe=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        (y,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert expected.abs().max() > 0.1  # large enough for the tolerance to matter
        torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-4)


def test_inject_prints_tables_without_json(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "inject",
        TINY_SPEC,
        "--at",
        "features.0,features.2",
        "--mode",
        "features.0=replace",
        "--groups",
        "features.2=2",
        *SIZE,
        "--dry-run",
        cwd=tmp_path,
        pythonpath=ws,
    )
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == ["dry run: nothing written"]
    out = result.stdout
    assert "ULSAM blocks" in out and "Totals" in out
    assert "replace" in out and "after" in out and "features.2" in out
    with pytest.raises(json.JSONDecodeError, match="line 1 column"):
        json.loads(out)
    assert snapshot(tmp_path) == {}


def test_inject_writes_every_output_and_count_rebuilds_the_file(ws: Path, tmp_path: Path) -> None:
    checkpoint = ws / "wrapped.pth"
    before = digest(checkpoint)
    (tmp_path / "m.safetensors").write_bytes(b"an old file, replaced with --force")
    result = run_cli(
        "inject",
        TINY_SPEC,
        "--model-kwargs",
        '{"num_classes": 4}',
        "--checkpoint",
        checkpoint,
        "--at",
        "0,-1",
        "--groups",
        "2",
        *SIZE,
        "--out",
        "m.safetensors",
        "--export",
        "m.pt2",
        "--plot",
        "m.png",
        "--force",
        "--json",
        cwd=tmp_path,
        pythonpath=ws,
    )
    assert result.code == 0, result.stderr
    names = ("m.safetensors", "m.pt2", "m.png")
    folder = tmp_path.resolve()
    assert result.stderr.splitlines() == [f"wrote {folder / n}" for n in names]
    report = result.json()
    assert report["dry_run"] is False
    assert report["written"] == [str(folder / n) for n in names]
    assert [(b["stage"], b["groups"]) for b in report["blocks"]] == [
        ("features.0", 2),
        ("features.2", 2),
    ]
    # Exactly the outputs: no temporary files left; the input checkpoint untouched.
    assert sorted(snapshot(tmp_path)) == sorted(names)
    assert digest(checkpoint) == before
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # A fresh process rebuilds the model from the file's recipe (kwargs included).
    # Its recipe names a callable (tinynet:tiny): rebuilding it runs code, so it needs trust.
    untrusted = run_cli("count", "m.safetensors", cwd=tmp_path, pythonpath=ws)
    assert untrusted.code == 2 and "--trust-recipe" in untrusted.stderr, untrusted.stderr
    counted = run_cli(
        "count", "m.safetensors", "--json", "--trust-recipe", cwd=tmp_path, pythonpath=ws
    )
    assert counted.code == 0, counted.stderr
    assert counted.stderr == ""
    document = counted.json()
    assert document["model"] == TINY_SPEC
    assert document["input_size"] == [3, 32, 32]
    assert document["params"] == report["after"]["params"]
    assert document["macs"] == report["after"]["macs"]

    from ulsam_inject import load

    with tiny_importable(ws):
        loaded = load(tmp_path / "m.safetensors", trust_recipe=True)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    rebuilt = loaded.state_dict()
    for key in ("stem.0.weight", "features.1.conv.4.running_var", "head.weight"):
        assert torch.equal(rebuilt[key], state[f"module.{key}"]), key  # the checkpoint's weights
    program = torch.export.load(tmp_path / "m.pt2").module()
    x = torch.randn(5, 3, 32, 32)  # any batch: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program(x), loaded(x), rtol=1e-5, atol=1e-6)


def test_trusted_pickled_checkpoint_is_read(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "count",
        TINY_SPEC,
        "--model-kwargs",
        '{"num_classes": 4}',
        "--checkpoint",
        ws / "whole.pt",
        "--trust-checkpoint",
        *SIZE,
        "--json",
        cwd=tmp_path,
        pythonpath=ws,
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    with tiny_importable(ws) as tinynet:
        params = sum(p.numel() for p in tinynet.tiny(num_classes=4).parameters())
    assert result.json()["params"] == params


def test_bench_json(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "bench",
        TINY_SPEC,
        "--at",
        "features.2",
        *SIZE,
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        cwd=tmp_path,
        pythonpath=ws,
    )
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # the progress bar only shows on a terminal
    document = result.json()
    assert document["model"] == TINY_SPEC and document["schema"] == "ulsam-inject.bench/1"
    assert document["plan"] == [{"at": "features.2", "groups": 4, "mode": "after"}]
    assert document["threads"] == 1 and document["batch"] == 1
    for side in ("before", "after"):
        assert document[side]["samples"] == 3
        assert document[side]["median_ms"] > 0
    assert document["ratio"] > 0
    assert snapshot(tmp_path) == {}


def test_stages_names_the_untraceable_leaves(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    result = run_cli("stages", "timm:mobilevit_xxs", "--input-size", "64", cwd=tmp_path)
    assert result.code == 0, result.stderr
    notes = result.stderr.splitlines()
    assert notes and all(line.startswith("untraceable, kept whole: ") for line in notes)
    assert any("stages.2.1 (" in line for line in notes)
    assert "stages.1.0" in result.stdout  # a stage outside the leaves


def test_a_failure_after_writing_removes_what_the_run_wrote(
    ws: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In process, to make the last output fail after the others were written.
    import ulsam_inject.measure.figure
    from ulsam_inject.cli.app import main

    def full_disk(*args: object, **kwargs: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ulsam_inject.measure.figure, "plot_retrofit", full_disk)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.pt2").write_bytes(b"replaced with --force, so not removed")
    args = ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "m.safetensors"]
    args += ["--export", "old.pt2", "--plot", "m.png", "--force"]
    with tiny_importable(ws), pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    assert exited.value.code == 1
    assert out == ""
    assert err.splitlines() == [
        "error: unexpected OSError: [Errno 28] No space left on device "
        "(run with --debug for details)"
    ]
    assert sorted(snapshot(tmp_path)) == ["old.pt2"]


def test_inject_seed_gives_the_api_blocks_bit_for_bit(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ulsam_inject import inject

    written = []
    for name in ("a.safetensors", "b.safetensors"):
        result = run_cli(
            "inject",
            "torchvision:mobilenet_v2",
            "--at",
            "features.13",
            "--input-size",
            "64",
            "--seed",
            "11",
            "--out",
            name,
            cwd=tmp_path,
        )
        assert result.code == 0, result.stderr
        written.append(load_file(str(tmp_path / name)))
    api = inject(
        "torchvision:mobilenet_v2", at="features.13", input_size=(3, 64, 64), seed=11
    ).model.state_dict()
    block_keys = [k for k in api if k.startswith("features.13.ulsam.")]
    assert block_keys
    for key in block_keys:
        assert torch.equal(written[0][key], written[1][key]), key
        assert torch.equal(written[0][key], api[key]), key


def test_stages_of_a_model_without_stages_says_how_to_name_modules(tmp_path: Path) -> None:
    result = run_cli("stages", "torchvision:resnet18", "--input-size", "64", cwd=tmp_path)
    assert result.code == 0, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("the model has no depthwise/pointwise stages; name modules")
    )
    injected = run_cli(
        "inject", "torchvision:resnet18", "--at", "layer3", "--input-size", "64", "--dry-run",
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert injected.code == 0, injected.stderr
    (block,) = injected.json()["blocks"]
    assert (block["stage"], block["module"], block["rewrite"]) == (
        "layer3",
        "layer3.ulsam",
        "stage",
    )
