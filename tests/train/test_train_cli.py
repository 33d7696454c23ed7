"""The finetune and evaluate commands, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    assert_one_line_error,
    cli_command,
    run_cli,
    snapshot,
    subprocess_env,
    tiny_importable,
)

from ulsam_inject import load
from ulsam_inject.io.artifact import read_recipe

TINY = ["tinynet:tiny", "--model-kwargs", '{"num_classes": 10}', "--input-size", "32"]
TRAIN = ["--epochs", "3", "--warmup-epochs", "1", "--batch-size", "8", "--lr", "0.02"]
TRAIN += ["--finetune-lr", "0.02", "--workers", "0", "--seed", "1", "--device", "cpu"]


def finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    at = ["--at", "features.0,features.2", "--num-classes", "3"]
    return ["finetune", *TINY, *at, "--data", str(data), "--out", str(out), *TRAIN, *extra]


@pytest.mark.slow
def test_finetune_interrupt_resume_and_evaluate(
    image_tree: Path, tiny_folder: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first.safetensors"
    args = finetune_args(image_tree, first, "--json")
    done = run_cli(*args, cwd=tmp_path, pythonpath=tiny_folder)
    assert done.code == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["schema"] for line in lines] == ["ulsam-inject.report/1"] + [
        "ulsam-inject.finetune-epoch/1"
    ] * 3 + ["ulsam-inject.finetune/1"]
    assert [line["phase"] for line in lines[1:4]] == ["warmup", "all", "all"]
    assert "replaced the head head (10 -> 3 classes)" in done.stderr
    assert f"wrote {first}" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors"]
    recipe = read_recipe(first)
    assert recipe["model_kwargs"] == {"num_classes": 3}
    training = recipe["training"]
    assert training["best_epoch"] == lines[-1]["best_epoch"]
    assert training["classes"] == ["blue", "green", "red"]
    assert training["settings"]["lr"] == 0.02

    # The same run, interrupted after its first epoch: a whole checkpoint, no output.
    second = tmp_path / "second.safetensors"
    state = tmp_path / "second.safetensors.resume.pt"
    process = subprocess.Popen(
        [*cli_command(), *finetune_args(image_tree, second, "--json")],
        cwd=tmp_path,
        env=subprocess_env(tiny_folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["schema"] == "ulsam-inject.finetune-epoch/1":
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"continue with --resume {state}" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors", state.name]

    # Resuming with other settings is another run: refused, nothing written.
    before = snapshot(tmp_path)
    other = run_cli(
        *finetune_args(image_tree, second, "--resume", str(state), "--label-smoothing", "0.2"),
        cwd=tmp_path,
        pythonpath=tiny_folder,
    )
    assert_one_line_error(other, 2, "is from another run", "label_smoothing")
    assert snapshot(tmp_path) == before

    resumed = run_cli(
        *finetune_args(image_tree, second, "--resume", str(state)),
        cwd=tmp_path,
        pythonpath=tiny_folder,
    )
    assert resumed.code == 0, resumed.stderr
    assert not state.exists()
    with tiny_importable(tiny_folder):
        a = load(first, trust_recipe=True).state_dict()
        b = load(second, trust_recipe=True).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    evaluated = run_cli(
        "evaluate", *TINY[:1], str(second), "--model-kwargs", '{"num_classes": 3}',
        "--input-size", "32", "--data", str(image_tree / "val"), "--workers", "0", "--json",
        "--trust-recipe", cwd=tmp_path, pythonpath=tiny_folder,
    )  # fmt: skip
    assert evaluated.code == 0, evaluated.stderr
    report = evaluated.json()
    assert report["schema"] == "ulsam-inject.evaluate/1"
    assert [m["name"] for m in report["models"]] == ["tinynet:tiny", str(second)]
    # The same images and preprocessing as the run's validation: the same top-1.
    assert report["models"][1]["top1"] == pytest.approx(training["best"]["val_top1"])
    assert len(report["comparisons"]) == 1
    table = run_cli(  # a relative name: a long path would wrap in the table's column
        "evaluate", second.name, "--data", str(image_tree / "val"), "--workers", "0",
        "--trust-recipe", cwd=tmp_path, pythonpath=tiny_folder,
    )  # fmt: skip
    assert table.code == 0, table.stderr
    assert "top-1 %" in table.stdout and second.name in table.stdout


def bad_tree(image_tree: Path, tmp_path: Path, case: str) -> Path:
    data = Path(shutil.copytree(image_tree, tmp_path / "data"))
    if case == "no-val":
        shutil.rmtree(data / "val")
    elif case == "empty-class":
        (data / "train" / "zebra").mkdir()
    return data


@pytest.mark.parametrize(
    ("case", "extra", "fragments"),
    [
        ("no-val", [], ["has no val/ folder"]),
        ("empty-class", [], ["zebra has no images"]),
        ("mismatch", [], ["3 classes and the model's head 10", "--num-classes 3"]),
        ("no-at", [], ["--at"]),
        ("resume-junk", [], ["not a fine-tuning checkpoint"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    image_tree: Path,
    tiny_folder: Path,
    tmp_path: Path,
    case: str,
    extra: list[str],
    fragments: list[str],
) -> None:
    data = bad_tree(image_tree, tmp_path, case)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.safetensors"
    args = ["finetune", *TINY, "--data", str(data), "--out", str(out), *TRAIN]
    if case != "no-at":
        args += ["--at", "features.0"]
    if case == "resume-junk":
        junk = work / "junk.pt"
        torch.save({"weights": torch.zeros(2)}, junk)
        args += ["--num-classes", "3", "--resume", str(junk)]
    before = snapshot(work)
    result = run_cli(*args, *extra, cwd=work, pythonpath=tiny_folder)
    assert_one_line_error(result, 2, *fragments)
    assert snapshot(work) == before
