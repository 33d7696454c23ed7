"""Files in and out: inputs checked before any format is guessed, outputs written whole.

:func:`check_input_file` tells plainly that an input is missing, a folder or empty, and
:func:`read_safetensors_header` recognises a safetensors file by its header, whatever its
suffix (checkpoints and artifacts share both). :func:`check_output_path` tells early (before
minutes of work) whether an output can be written; :func:`atomic_write` writes to a
temporary file in the same folder and renames it onto the target, so a crash or a failing
writer never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

from ulsam_inject.errors import OutputError, UlsamError, WriteError
from ulsam_inject.guards import echo

__all__ = [
    "atomic_write",
    "check_input_file",
    "check_output_path",
    "looks_like_safetensors",
    "read_safetensors_header",
]

PathLike: TypeAlias = "str | os.PathLike[str]"
SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


def check_input_file(path: Path, *, kind: str, expected: str, error: type[UlsamError]) -> int:
    """Check that ``path`` is a readable, non-empty regular file; return its size in bytes.

    Raises ``error`` with a message naming the file as ``kind`` (``"checkpoint"``): it does
    not exist (nor its folder), is a directory (``expected`` says what was wanted), is not a
    regular file, cannot be read, or is empty.
    """
    if not path.exists():
        hint = " (its folder does not exist either)" if not path.parent.exists() else ""
        raise error(f"{kind} {path} does not exist{hint}")
    if path.is_dir():
        raise error(f"{kind} {path} is a directory, expected {expected}")
    if not path.is_file():
        raise error(f"{kind} {path} is not a regular file")
    try:
        size = path.stat().st_size
    except OSError as failure:
        raise error(f"cannot read {kind} {path}: {failure.strerror}") from None
    if size == 0:
        raise error(f"{kind} {path} is empty (0 bytes)")
    return size


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first 9 bytes start a safetensors file: an 8-byte little-endian
    header length followed by the start of a JSON object."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def read_safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file; None when ``path`` is not one.

    Only the header is read (not the tensors). ``OSError`` is left to the caller, which
    knows what the file was meant to be.
    """
    with path.open("rb") as handle:
        head = handle.read(9)
        if not looks_like_safetensors(head):
            return None
        header = head[8:] + handle.read(int.from_bytes(head[:8], "little") - 1)
    try:
        value = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def check_output_path(path: PathLike, *, force: bool, protect: PathLike | None = None) -> Path:
    """Check that ``path`` can be written, and return it resolved.

    Raises :class:`OutputError` when the path is a directory or another non-regular file,
    exists and ``force`` is false, is the same file as ``protect`` (e.g. the input
    checkpoint), or its folder is missing or not writable (checked by creating and removing
    a probe file, so read-only mounts and ACLs are caught too).

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> check_output_path(os.path.join(folder, "out.safetensors"), force=False).name
        'out.safetensors'
    """
    target = Path(os.fspath(path)).expanduser().resolve()
    _check_name(target)
    if protect is not None and _same_file(target, Path(os.fspath(protect))):
        raise OutputError(
            f"output {target} is the same file as the input {protect}; choose another path"
        )
    if target.is_dir():
        raise OutputError(f"output {target} is a directory; give a file path inside it")
    if target.exists():
        if not target.is_file():
            raise OutputError(f"output {target} exists and is not a regular file")
        if not force:
            raise OutputError(f"output {target} exists; pass force=True (--force) to replace it")
    folder = target.parent
    if not folder.exists():
        raise OutputError(f"output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {folder} is not writable")
    _probe(folder)
    return target


def atomic_write(
    path: PathLike,
    write: Callable[[Path], None],
    *,
    force: bool,
    protect: PathLike | None = None,
) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary file, which then replaces ``path``.

    The temporary file lives in the target's folder (so the final rename is atomic) and
    has the target's suffix (some writers pick a format by it). On any exception it is
    removed and the exception re-raised; the target is then untouched. SIGTERM and SIGHUP
    (when their handler is the default, which would kill the process on the spot) become
    ``SystemExit(128 + signal)`` for the duration, so that the temporary file is removed
    too; SIGINT raises KeyboardInterrupt as usual. An ``OSError`` while writing becomes
    :class:`WriteError` (a full disk, exit code 1) or :class:`OutputError` (a name the
    filesystem refuses, exit code 2). Without ``force``
    an existing target is never replaced, even one created while ``write`` ran. The file
    gets the permissions a plain ``open(path, "w")`` would give, or keeps those of the
    file it replaces.

    Example:
        >>> import tempfile, os
        >>> target = os.path.join(tempfile.mkdtemp(), "notes.txt")
        >>> path = atomic_write(target, lambda tmp: tmp.write_text("hello"), force=False)
        >>> path.read_text()
        'hello'
    """
    target = check_output_path(path, force=force, protect=protect)
    # Short enough for any filesystem that took the target's name; the suffix is kept
    # (some writers pick a format by it).
    suffix = target.suffix if len(target.suffix) <= 16 else ""
    with _signals_as_exit():
        try:
            handle, name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name[:40]}.", suffix=suffix
            )
        except OSError as error:
            raise OutputError(f"cannot write in {target.parent}: {error.strerror}") from None
        os.close(handle)
        tmp = Path(name)
        try:
            write(tmp)
            if not tmp.is_file():
                raise OutputError(f"the writer for {target} did not leave its file at {tmp}")
            os.chmod(tmp, _mode_for(target))
            _fsync(tmp)
            _publish(tmp, target, force=force)
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise _write_error(target, error) from error
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    _fsync_folder(target.parent)
    return target


@contextlib.contextmanager
def _signals_as_exit() -> Iterator[None]:
    """Within: SIGTERM/SIGHUP raise SystemExit(128 + signal) where they would kill at once.

    Only where the handler is the default one (an application's own handler is left
    alone) and only in the main thread (Python runs handlers there alone). A second
    signal while the first unwinds is ignored, so cleanup finishes; the previous handlers
    are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        raise SystemExit(128 + signum)

    previous: dict[int, Any] = {}
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# A name the filesystem refuses is the user's to change (exit 2); the rest is the disk's.
_NAME_ERRORS = (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ)


def _write_error(target: Path, error: OSError) -> OutputError | WriteError:
    why = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0, "")
    if error.errno in _NAME_ERRORS:
        return OutputError(f"cannot write {echo(str(target))}: {why}; choose another name")
    return WriteError(
        f"cannot write {target}: {why}{f' ({code})' if code else ''}; nothing was written "
        f"and the folder is as it was"
    )


def _check_name(target: Path) -> None:
    """A file name (or path) longer than the filesystem takes: one line, before any work."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX") if target.parent.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(target.name)) > limit:
        raise OutputError(
            f"output name {echo(target.name)} is {len(os.fsencode(target.name))} bytes long; "
            f"this filesystem takes at most {limit}: choose a shorter name"
        )


def _publish(tmp: Path, target: Path, *, force: bool) -> None:
    """Move ``tmp`` onto ``target``; without ``force``, never over a file that appeared since."""
    if force:
        os.replace(tmp, target)
        return
    try:
        # A hard link fails if the target exists, atomically: no window in which a file
        # created by someone else meanwhile would be overwritten.
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(
            f"output {target} appeared while it was being written; pass force=True (--force) "
            f"to replace it"
        ) from None
    except OSError:
        # Filesystems without hard links (FAT, some network mounts): plain rename.
        os.replace(tmp, target)
        return
    tmp.unlink()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: os.access misses read-only mounts for root."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".ulsam-probe-")
    except OSError as error:
        raise OutputError(f"output folder {folder} is not writable ({error.strerror})") from None
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(name)


def _mode_for(target: Path) -> int:
    """Permissions for the new file: those it replaces, or 0o666 less the umask.

    mkstemp creates files readable by their owner only, which would silently make every
    output private.
    """
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:
        # Linux reports the umask without changing it, so no other thread sees a window.
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every platform can open a folder, so best effort."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
