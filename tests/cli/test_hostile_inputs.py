"""Hostile input to the real ``ulsam-inject`` script, each case in a subprocess.

Tampered recipes never run their code, type-confused files are one line, a signal during a
write leaves no temporary file, absurd sizes are refused before memory is spent. The API
side of the same cases is in tests/io/test_hostile_files.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import (
    TINY_SIZE,
    TINY_SPEC,
    assert_one_line_error,
    cli_command,
    run_cli,
    snapshot,
    subprocess_env,
    write_tiny_module,
)
from safetensors.torch import save_file

from ulsam_inject.cli.app import main
from ulsam_inject.io.artifact import FORMAT, RECIPE_KEY

SIZE = ("--input-size", TINY_SIZE)
SLOW = pytest.mark.slow  # one more start of torch each; run by the full suite all the same
PLAN = [{"at": "features.0", "groups": 4, "mode": "after"}]


def write_recipe(path: Path, recipe: Any) -> Path:
    text = json.dumps(recipe)
    if path.suffix == ".pt":
        torch.save({"format": FORMAT, "recipe": text, "state_dict": {"w": torch.ones(1)}}, path)
    else:
        save_file({"w": torch.ones(1)}, str(path), metadata={RECIPE_KEY: text})
    return path


def recipe(**fields: Any) -> dict[str, Any]:
    base = {"format": FORMAT, "model": "torchvision:mobilenet_v2", "model_kwargs": {}}
    return {**base, "plan": PLAN, "input_size": [3, 32, 32], **fields}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    write_tiny_module(folder)
    for suffix in (".safetensors", ".pt"):
        payload = {"command": f"touch {folder / ('MARKER' + suffix)}"}
        write_recipe(folder / f"tampered{suffix}", recipe(model="os:system", model_kwargs=payload))
    write_recipe(folder / "plan-list.pt", recipe(plan=[["features.0", 4, "after"]]))
    write_recipe(folder / "newer.safetensors", recipe(format="ulsam-inject/7"))
    write_recipe(folder / "sizes.safetensors", recipe(input_size=["3", "32", "32"]))
    write_recipe(
        folder / "overlay.safetensors",
        recipe(
            model="timm:mobilenetv3_small_050",
            model_kwargs={"pretrained_cfg_overlay": {"file": str(folder / "x.pth")}},
        ),
    )
    header = json.dumps({"__metadata__": ["a", "list"]}).encode()
    (folder / "meta-list.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


# -- A: files are data --------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", ["count", "stages", *(pytest.param(c, marks=SLOW) for c in ("inject", "bench"))]
)
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_tampered_recipe_never_runs_its_command(
    ws: Path, tmp_path: Path, command: str, suffix: str
) -> None:
    marker = ws / f"MARKER{suffix}"
    args = [command, ws / f"tampered{suffix}"]
    if command in ("inject", "bench"):
        args += ["--at", "0"]
    result = run_cli(*args, cwd=tmp_path, pythonpath=ws)
    assert not marker.exists()
    if command in ("inject", "bench"):
        # Refused from the recipe alone: a retrofitted file is never built to be re-injected.
        assert_one_line_error(result, 2, "already retrofitted", "os:system")
    else:
        assert_one_line_error(result, 2, "'os:system'", "--trust-recipe", f"tampered{suffix}")
    assert snapshot(tmp_path) == {}


def test_a_file_may_not_point_timm_at_other_files(ws: Path, tmp_path: Path) -> None:
    result = run_cli("count", ws / "overlay.safetensors", cwd=tmp_path, pythonpath=ws)
    assert_one_line_error(result, 2, "'pretrained_cfg_overlay'", "--trust-recipe")


# -- B: type-confused files -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("plan-list.pt", ["plan-list.pt", "plan[0]", "a list"]),
        pytest.param("newer.safetensors", ["'ulsam-inject/7'", "reads ulsam-inject/1"], marks=SLOW),
        pytest.param("sizes.safetensors", ["'input_size'", "integers"], marks=SLOW),
        pytest.param("meta-list.safetensors", ["'__metadata__'", "a list"], marks=SLOW),
    ],
)
def test_type_confused_files_are_one_line(
    ws: Path, tmp_path: Path, name: str, fragments: list[str]
) -> None:
    result = run_cli("stages", ws / name, cwd=tmp_path, pythonpath=ws)
    assert_one_line_error(result, 2, name, *fragments)


# -- C: nothing is lost on write --------------------------------------------------------------

WRITER = """
import os, sys, time
from pathlib import Path
from ulsam_inject.io.fileio import atomic_write

target = Path(sys.argv[1])

def write(tmp):
    with tmp.open("wb") as handle:
        for _ in range(10_000):
            handle.write(b"x" * 65536)
            handle.flush()
            Path(sys.argv[2]).touch()  # writing has begun
            time.sleep(0.01)

atomic_write(target, write, force=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, signum: int
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"the old file")
    started = tmp_path.parent / f"{tmp_path.name}-started"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(started)],
        env=subprocess_env(),
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        assert child.poll() is None, child.stderr.read() if child.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(os.listdir(tmp_path)) == 2  # the target and its temporary file, growing
    child.send_signal(signum)
    code = child.wait(timeout=30)
    assert code != 0
    if signum == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM  # SystemExit(143), after the cleanup
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]
    assert target.read_bytes() == b"the old file"


def test_a_file_too_large_for_the_disk_is_exit_1_and_leaves_nothing(
    ws: Path, tmp_path: Path
) -> None:
    # RLIMIT_FSIZE makes every write past 4 KiB fail with EFBIG, as a full disk fails
    # with ENOSPC: the writer's I/O error, not a usage error.
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run(
        [*cli_command(), "inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "m.safetensors"],
        cwd=tmp_path,
        env=subprocess_env(ws),
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=limit,
        check=False,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: cannot write"), done.stderr
    assert "File too large" in lines[0] and "nothing was written" in lines[0]
    assert snapshot(tmp_path) == {}


# -- D: sizes checked before memory is spent ---------------------------------------------------


def run_measured(args: list[str], cwd: Path, pythonpath: Path) -> tuple[int, str, int]:
    """Exit code, stderr and peak RSS (bytes) of one CLI run."""
    child = subprocess.Popen(
        [*cli_command(), *args],
        cwd=cwd,
        env=subprocess_env(pythonpath),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stderr is not None
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, stderr, usage.ru_maxrss * 1024


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["bench", TINY_SPEC, "--at", "0", *SIZE, "--batch", "100000000"], ["GiB", "batch"]),
        pytest.param(
            ["bench", "torchvision:mobilenet_v2", "--at", "13", "--batch", "100000"],
            ["GiB"],
            marks=SLOW,
        ),
        (["count", TINY_SPEC, "--input-size", "100000"], ["at most 4096"]),
        pytest.param(
            ["stages", TINY_SPEC, "--input-size", "3x5000x64"], ["at most 4096"], marks=SLOW
        ),
    ],
)
def test_huge_sizes_are_refused_in_bounded_memory(
    ws: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    code, stderr, peak = run_measured(args, tmp_path, ws)
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), stderr
    assert peak < 3 * 2**30, peak  # torch itself takes about 1 GiB; the batch would be 60+


# -- E: one clear line, the right exit code ----------------------------------------------------


def run_here(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


@pytest.fixture
def tinynet(ws: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(ws))
    monkeypatch.chdir(tmp_path)


E_CASES = [
    (
        "num-classes-negative",
        ["count", "torchvision:mobilenet_v2", "--model-kwargs", '{"num_classes": -1}', *SIZE],
        ["num_classes", "negative dimension"],
    ),
    (
        "timm-unknown-keyword",
        ["count", "timm:mobilenetv3_small_050", "--model-kwargs", '{"bogus": 1}', *SIZE],
        ["'bogus'"],
    ),
    ("out-txt", ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "model.txt"], [".txt"]),
    ("out-onnx", ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "model.onnx"], [".onnx"]),
    (
        "out-name-too-long",
        ["inject", TINY_SPEC, "--at", "0", *SIZE, "--out", "n" * 300 + ".pt"],
        ["shorter name"],
    ),
    (
        "groups-conflict",
        ["inject", TINY_SPEC, "--at", "0", "-g", "features.0=4", "-g", "features.0=8"],
        ["--groups", "'features.0'", "4", "8"],
    ),
    ("groups-conflict-common", ["inject", TINY_SPEC, "--at", "0", "-g", "4", "-g", "2"], ["4"]),
    ("at-100kb", ["inject", TINY_SPEC, "--at", "q" * 100_000, *SIZE], ["(100000 characters)"]),
    ("at-digits", ["inject", TINY_SPEC, "--at", "9" * 5000, *SIZE], ["stage index"]),
]


@pytest.mark.parametrize(
    ("args", "fragments"), [pytest.param(a, f, id=name) for name, a, f in E_CASES]
)
def test_bad_input_is_one_short_line_with_exit_2(
    tinynet: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    fragments: list[str],
) -> None:
    if "timm:" in args[1]:
        pytest.importorskip("timm")
    code, out, err = run_here(args, capsys, monkeypatch)
    lines = err.splitlines()
    assert code == 2, err
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "Warning" not in err
    assert len(lines[0]) < 600, len(lines[0])
    assert all(f in lines[0] for f in fragments), lines[0]
    assert os.listdir(tmp_path) == []


@SLOW
def test_a_file_recipe_runs_with_trust(ws: Path, tmp_path: Path) -> None:
    # The positive side of --trust-recipe: a callable spec in a file rebuilds when trusted.
    script = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(ws)!r})
        import tinynet
        from ulsam_inject import inject, save
        save(inject(tinynet.tiny(), at="features.0", input_size=(3, 32, 32)),
             {str(tmp_path / "t.pt")!r}, source="tinynet:tiny")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=subprocess_env())
    refused = run_cli("count", "t.pt", cwd=tmp_path, pythonpath=ws)
    assert_one_line_error(refused, 2, "'tinynet:tiny'", "--trust-recipe")
    trusted = run_cli("count", "t.pt", "--trust-recipe", "--json", cwd=tmp_path, pythonpath=ws)
    assert trusted.code == 0, trusted.stderr
    assert trusted.json()["model"] == TINY_SPEC
