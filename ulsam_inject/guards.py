"""Guards against absurd or hostile input: size limits and bounded echoes of user values.

Every message that repeats what the user gave goes through :func:`echo`, so a 100 kB
argument is not printed back whole (messages that quote another library's error go through
:func:`ulsam_inject.errors.first_line`, which cuts at a clause or word boundary).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

from ulsam_inject.errors import InputSizeError, ModelArgumentError

__all__ = [
    "ECHO_LIMIT",
    "MAX_INPUT_SIDE",
    "check_input_limits",
    "check_model",
    "echo",
    "echo_path",
]

MAX_INPUT_SIDE = 4096
"""The largest input channels, height or width accepted (a 4096x4096 image is 64 MiB in fp32)."""
ECHO_LIMIT = 80
"""How many characters of a user value a message repeats."""


def echo(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for a message, cut to about ``limit`` characters.

    Example:
        >>> echo("features.13")
        "'features.13'"
        >>> echo("x" * 1000, limit=10)
        "'xxxxxxxxxx'... (1000 characters)"
    """
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def echo_path(path: object, limit: int = ECHO_LIMIT) -> str:
    """A path for a message, quoted; a long one keeps its end, where the file's name is.

    Example:
        >>> echo_path("/data/" + "d" * 100 + "/cat.png", limit=12)
        "'...d/cat.png'"
    """
    text = str(path)
    return repr(text) if len(text) <= limit else repr("..." + text[-(limit - 3) :])


def check_input_limits(size: Sequence[int], what: str = "input size") -> None:
    """Refuse a (C, H, W) with a side above :data:`MAX_INPUT_SIDE` (:class:`InputSizeError`).

    Example:
        >>> check_input_limits((3, 224, 224))
        >>> check_input_limits((3, 5000, 224))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ulsam_inject.errors.InputSizeError: input size 3x5000x224 is too large: ...
    """
    if any(isinstance(v, int) and v > MAX_INPUT_SIDE for v in size):
        shown = "x".join(str(v) for v in size)
        raise InputSizeError(
            f"{what} {shown} is too large: "
            f"each of channels, height and width must be at most {MAX_INPUT_SIDE}"
        )


def check_model(model: object, *, function: str, accepted: str = "an nn.Module") -> None:
    """Refuse what is not a usable module: another type, or weights on the meta device.

    Raises :class:`~ulsam_inject.errors.ModelArgumentError` naming the type received, or
    the first parameter or buffer that holds no data.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelArgumentError(
            f"{function}() takes {accepted}, got {type(model).__name__} {echo(model)}"
        )
    tensors = chain(model.named_parameters(), model.named_buffers())
    meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if meta is not None:
        raise ModelArgumentError(
            f"{function}(): the model's weights are on the meta device (e.g. {meta!r}), so they "
            f"hold no data to copy or run; materialize it first, e.g. "
            f"model.to_empty(device='cpu') and load its weights"
        )
