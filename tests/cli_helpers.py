"""Running the real console script in a subprocess, and a tiny model it can import.

Every CLI test pays one Python start with torch (a few seconds), so the model is tiny and
the input small. ``TINY_SOURCE`` is written as ``tinynet.py`` into a folder that the
subprocess gets on ``PYTHONPATH``; its spec is ``tinynet:tiny``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

TINY_SPEC = "tinynet:tiny"
TINY_SIZE = "32"
# features.0 and features.2 keep their shape (8 -> 8, 16 -> 16, residual, replaceable);
# features.1 halves the resolution and doubles the channels (not replaceable).
# ``tinynet:broken`` cannot run at all.
TINY_SOURCE = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class Tiny(nn.Module):
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.features = nn.Sequential(
            Block(width, width), Block(width, 2 * width, stride=2), Block(2 * width, 2 * width)
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.features(self.stem(x))
        return self.head(x.mean((2, 3)))


def tiny(num_classes=10, width=8):
    return Tiny(num_classes=num_classes, width=width)


class Broken(Tiny):
    # Traces, but its forward fails on any input: a failure that is not the user's input.
    def forward(self, x):
        return self.features(self.stem(x)).view(-1, 7, 13)


def broken():
    return Broken()
"""


def write_tiny_module(folder: Path) -> Path:
    """Write ``tinynet.py`` into ``folder`` (to go on PYTHONPATH) and return its path."""
    path = folder / "tinynet.py"
    path.write_text(TINY_SOURCE)
    return path


@contextlib.contextmanager
def tiny_importable(folder: Path) -> Iterator[ModuleType]:
    """``tinynet`` (written in ``folder``) importable in this process, for a while.

    Pickling a whole module and rebuilding ``tinynet:tiny`` from a recipe both import it by
    name; afterwards sys.path and sys.modules are as they were.
    """
    import importlib

    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("tinynet")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("tinynet", None)


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("ulsam-inject")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "ulsam_inject"]


def subprocess_env(pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a CLI run: no terminal colours, the tiny model importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONPATH")}
    env["NO_COLOR"] = "1"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env.update(extra)
    return env


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout as exactly one JSON document (json.loads refuses trailing data)."""
        return json.loads(self.stdout)


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path,
    pythonpath: Path | None = None,
    timeout: float = 240,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run the CLI with ``args`` in ``cwd`` and capture its exit code and output."""
    done = subprocess.run(
        [*(command or cli_command()), *map(str, args)],
        cwd=cwd,
        env=env or subprocess_env(pythonpath),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(result: Result, code: int, *fragments: str) -> str:
    """The run failed with ``code``, printed nothing on stdout and one line on stderr."""
    lines = result.stderr.splitlines()
    assert result.code == code, (result.code, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == "", result.stdout
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative name -> content hash), hidden ones too."""
    return {
        str(path.relative_to(folder)): digest(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }
