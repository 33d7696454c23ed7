"""The README's Python quick start runs as written (in a temporary folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_python_quick_start_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = README.read_text().split("## Quick start: Python", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert os.path.exists(tmp_path / "mnv2_ulsam.safetensors")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        again = namespace["again"].eval()  # type: ignore[attr-defined]
        result = namespace["result"].model.eval()  # type: ignore[attr-defined]
        assert torch.equal(again(x), result(x))


def test_public_api_is_what_the_readme_lists() -> None:
    import ulsam_inject

    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert sorted(ulsam_inject.__all__) == sorted(listed)
    assert len(ulsam_inject.__all__) == len(set(ulsam_inject.__all__))
