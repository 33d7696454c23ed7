"""Writing outputs safely (fileio.py): checks up front, whole files or none."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ulsam_inject.errors import OutputError
from ulsam_inject.io import fileio
from ulsam_inject.io.fileio import atomic_write, check_output_path


def write_text(text: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(text)

    return write


def output_error(call: Callable[[], object]) -> str:
    with pytest.raises(OutputError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- check_output_path ------------------------------------------------------------------


def test_check_returns_the_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    assert check_output_path("sub/../out.pt", force=False) == tmp_path / "out.pt"


def test_check_existing_file_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_text("keep")
    message = output_error(lambda: check_output_path(target, force=False))
    assert str(target) in message and "exists" in message and "--force" in message
    assert check_output_path(target, force=True) == target
    assert target.read_text() == "keep"


def test_check_directory(tmp_path: Path) -> None:
    assert "is a directory" in output_error(lambda: check_output_path(tmp_path, force=True))


def test_check_missing_parent(tmp_path: Path) -> None:
    message = output_error(lambda: check_output_path(tmp_path / "no" / "out.pt", force=False))
    assert f"output folder {tmp_path / 'no'} does not exist" in message


def test_check_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    message = output_error(lambda: check_output_path(tmp_path / "file" / "out.pt", force=False))
    assert "is not a folder" in message


def test_check_refuses_a_non_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert "not a regular file" in output_error(lambda: check_output_path(fifo, force=True))


def test_check_parent_not_writable_per_os_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root may write anywhere, so the permission answer is simulated.
    monkeypatch.setattr(fileio.os, "access", lambda *args, **kwargs: False)
    message = output_error(lambda: check_output_path(tmp_path / "out.pt", force=False))
    assert f"output folder {tmp_path} is not writable" in message


def test_check_parent_not_writable_per_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a read-only mount does: os.access says yes, creating a file fails.
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    message = output_error(lambda: check_output_path(tmp_path / "out.pt", force=False))
    assert "is not writable (Read-only file system)" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_check_parent_not_writable_for_real(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert "not writable" in output_error(lambda: check_output_path(folder / "o", force=False))
    finally:
        folder.chmod(stat.S_IRWXU)


def test_check_leaves_no_probe_file(tmp_path: Path) -> None:
    check_output_path(tmp_path / "out.pt", force=False)
    assert list(tmp_path.iterdir()) == []


# --- atomic_write -----------------------------------------------------------------------


def test_atomic_write_real_safetensors_file(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    target = tmp_path / "w.safetensors"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        save_file(tensors, str(tmp))

    assert atomic_write(target, write, force=False) == target
    assert torch.equal(load_file(str(target))["w"], tensors["w"])
    # The writer got a temporary file beside the target, with the target's suffix.
    assert seen[0].parent == tmp_path and seen[0].suffix == ".safetensors" and seen[0] != target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_existing_file_untouched_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("original")
    called: list[Path] = []
    message = output_error(
        lambda: atomic_write(target, lambda tmp: called.append(tmp), force=False)
    )
    assert "exists" in message
    assert called == []  # refused before any work
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_existing_file_replaced_with_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("original")
    atomic_write(target, write_text("new"), force=True)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error", [RuntimeError("writer broke"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failing_writer_leaves_nothing_behind(
    tmp_path: Path, error: BaseException, existing: bool
) -> None:
    target = tmp_path / "out.pt"
    if existing:
        target.write_text("original")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise error

    # The writer's own exception comes through unchanged (KeyboardInterrupt has no message).
    with pytest.raises(type(error), match=f"^{re.escape(str(error))}$"):
        atomic_write(target, write, force=True)
    if existing:
        assert target.read_text() == "original"
        assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_nonexistent_parent(tmp_path: Path) -> None:
    message = output_error(
        lambda: atomic_write(tmp_path / "missing" / "out.pt", write_text("x"), force=False)
    )
    assert "does not exist" in message
    assert not (tmp_path / "missing").exists()


def test_protected_input_is_never_overwritten(tmp_path: Path) -> None:
    checkpoint = tmp_path / "in.pt"
    checkpoint.write_text("weights")
    os.link(checkpoint, tmp_path / "hardlink.pt")
    (tmp_path / "sub").mkdir()
    for output in (checkpoint, tmp_path / "sub" / ".." / "in.pt", tmp_path / "hardlink.pt"):
        with pytest.raises(OutputError, match="same file as the input"):
            atomic_write(output, write_text("x"), force=True, protect=checkpoint)
    assert checkpoint.read_text() == "weights"
    # A different output next to the protected input is fine.
    atomic_write(tmp_path / "out.pt", write_text("x"), force=False, protect=checkpoint)


def test_file_created_meanwhile_is_not_overwritten_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"

    def write(tmp: Path) -> None:
        tmp.write_text("mine")
        target.write_text("someone else's")  # appears while we write

    message = output_error(lambda: atomic_write(target, write, force=False))
    assert "appeared while it was being written" in message
    assert target.read_text() == "someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_writer_that_removes_its_file(tmp_path: Path) -> None:
    message = output_error(
        lambda: atomic_write(tmp_path / "o.pt", lambda tmp: tmp.unlink(), force=False)
    )
    assert "did not leave its file" in message
    assert list(tmp_path.iterdir()) == []


def test_new_file_gets_default_permissions(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        target = atomic_write(tmp_path / "o.txt", write_text("x"), force=False)
    finally:
        os.umask(old)
    # mkstemp alone would give 0o600.
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "o.txt"
    target.write_text("old")
    target.chmod(0o604)
    atomic_write(target, write_text("new"), force=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o604


def test_temp_file_creation_failure_is_an_output_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_mkstemp = tempfile.mkstemp
    calls: list[object] = []

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        calls.append(kwargs.get("prefix"))
        if len(calls) > 1:  # the probe passes; the real temporary file does not
            raise OSError(28, "No space left on device")
        return real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    message = output_error(lambda: atomic_write(tmp_path / "o.pt", write_text("x"), force=False))
    assert "No space left on device" in message
    assert list(tmp_path.iterdir()) == []
