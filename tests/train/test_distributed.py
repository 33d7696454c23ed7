"""torchrun with 2 CPU processes (gloo) equals one process on the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import subprocess_env, tiny_importable

from ulsam_inject import load
from ulsam_inject.io.artifact import read_recipe

ARGS = ["tinynet:tiny", "--model-kwargs", '{"num_classes": 3}', "--input-size", "32"]
ARGS += ["--at", "features.0,features.2", "--epochs", "2", "--warmup-epochs", "1"]
ARGS += ["--batch-size", "8", "--lr", "0.05", "--workers", "0", "--device", "cpu", "--sync-bn"]
# SGD, not AdamW: a conv bias just before a BatchNorm (ULSAM's) has a zero gradient up to
# rounding, which Adam's normalised step turns into lr-sized moves that differ with the
# order of float sums; SGD keeps rounding differences at rounding size.
ARGS += ["--optimizer", "sgd"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(image_tree: Path, tiny_folder: Path, tmp_path: Path) -> None:
    env = subprocess_env(tiny_folder, OMP_NUM_THREADS="1")
    outputs = {}
    for processes in (1, 2):
        folder = tmp_path / f"n{processes}"
        folder.mkdir()
        out = folder / "model.safetensors"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={processes}", "-m", "ulsam_inject", "finetune", *ARGS]
        command += ["--data", str(image_tree), "--out", str(out)]
        done = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr
        # Rank 0 alone prints and writes: one line per epoch, one best line, one file.
        epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
        assert len(epochs) == 2, done.stdout
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
        assert done.stderr.count("wrote ") == 1, done.stderr
        outputs[processes] = out
    recipes = [read_recipe(outputs[n])["training"] for n in (1, 2)]
    assert [r["world_size"] for r in recipes] == [1, 2]
    # Metrics summed over both processes: the same images counted once.
    for one, two in zip(recipes[0]["history"], recipes[1]["history"]):
        assert two["val_top1"] == pytest.approx(one["val_top1"])
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    with tiny_importable(tiny_folder):
        one_state = load(outputs[1], trust_recipe=True).state_dict()
        two_state = load(outputs[2], trust_recipe=True).state_dict()
    for name, value in one_state.items():
        torch.testing.assert_close(two_state[name], value, rtol=1e-4, atol=1e-5, msg=name)
