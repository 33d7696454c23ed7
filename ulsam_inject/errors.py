"""One exception hierarchy for the whole library.

Every error the library raises on purpose derives from :class:`UlsamError`. Errors caused by
what the user gave (a position, a group count, a file, a model spec) derive from
:class:`UlsamUsageError`, which is also a :class:`ValueError`; the CLI maps those to exit
code 2 and everything else to exit code 1. Messages say what was given and what is valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UlsamError(Exception):
    """Base class of every error raised on purpose by ulsam_inject."""

    exit_code = 1


class UlsamUsageError(UlsamError, ValueError):
    """The input was wrong: an argument, a position, a file, a model spec."""

    exit_code = 2


class BlockConfigError(UlsamUsageError):
    """A ULSAM block was built or called with arguments it cannot take."""


class PositionError(UlsamUsageError):
    """A position spec names no stage, is out of range, or lies inside an untraceable leaf."""


class GroupsError(UlsamUsageError):
    """A group count does not divide the channels at its position."""


class InitError(UlsamUsageError):
    """An init (how a new block starts) is not one of the block's initializations."""


class ModeError(UlsamUsageError):
    """A mode is neither "after" nor "replace"."""


class ReplaceError(UlsamUsageError):
    """A stage asked to be replaced does not keep its input shape."""


class InputSizeError(UlsamUsageError):
    """An input size is malformed or too small for the model."""


class ModelSpecError(UlsamUsageError):
    """A model spec cannot be resolved to a model factory."""


class MissingDependencyError(UlsamUsageError):
    """An optional package (e.g. timm) is needed for what was asked and is not installed."""


class CheckpointError(UlsamUsageError):
    """A checkpoint file is missing, unreadable, corrupt, untrusted or does not fit the model."""


class OutputError(UlsamUsageError):
    """An output path exists already, or its folder is missing or not writable."""


class ArtifactError(UlsamUsageError):
    """A retrofitted-model file is not one this library wrote, or its recipe is invalid."""


class FetchError(UlsamError):
    """Pretrained weights could not be fetched from the network or read from the zoo's cache."""


class TraceError(UlsamError):
    """The model could not be traced, even with untraceable submodules made leaves."""


class ShapeError(UlsamError):
    """Shapes could not be propagated through the traced model."""


def first_line(
    error: BaseException | str, *, limit: int | None = 160, sentence: bool = True
) -> str:
    """The gist of ``error``'s message, for a one-line error of our own.

    The first non-empty line, and of it only the first sentence when ``sentence`` is true
    (torch's messages go on for paragraphs); past ``limit`` characters it is cut at a
    clause or word boundary, never inside a word, and ends in `` ...``; the exception's
    type name when the message is empty.

    Example:
        >>> first_line(ValueError("bad shape. More on this.\\nTraceback"))
        'bad shape'
        >>> first_line("one two three four five six", limit=14)
        'one two three ...'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    text = lines[0].split(". ")[0].rstrip(".") if sentence else lines[0]
    if limit is None or len(text) <= limit:
        return text
    head = text[:limit]
    for mark in ("; ", ", ", ": ", " "):
        cut = head.rfind(mark)
        if cut > limit // 2:
            return head[:cut].rstrip(",;:") + " ..."
    return head + " ..."


def describe(error: BaseException, *, limit: int | None = 160, sentence: bool = True) -> str:
    """``"TypeName: first line"``: what went wrong inside, for a message that wraps it."""
    return f"{type(error).__name__}: {first_line(error, limit=limit, sentence=sentence)}"


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``"did you mean a, b?"`` with the candidates closest to ``name``, or ``""`` if none is.

    Example:
        >>> did_you_mean("mobilenet_v3", ["mobilenet_v2", "resnet18"])
        'did you mean mobilenet_v2?'
    """
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else ""


class UntrustedRecipeError(ArtifactError):
    """A recipe read from a file asks for something a file may not: code or network/file access."""


class RecipeVersionError(ArtifactError):
    """A retrofitted-model file was written in a format version this release does not read."""


class ModelArgumentError(UlsamUsageError):
    """The model passed is not an nn.Module (or spec), or its weights hold no data (meta)."""


class ResourceLimitError(UlsamUsageError):
    """A size (input side, batch) is beyond a documented limit or the memory available."""


class WriteError(UlsamError):
    """An output could not be written: the disk is full, over quota or failing."""


class DataError(UlsamUsageError):
    """A data folder is missing, empty or malformed, or its classes do not fit the model."""


class ResumeError(UlsamUsageError):
    """A file given to resume from is not a fine-tuning checkpoint of this very run."""


class TrainingError(UlsamError):
    """Training failed on its own terms (e.g. the loss became NaN or infinite)."""


class LayerError(UlsamUsageError):
    """A layer name names no module of the model, or a module without a 4-D feature map."""


class ImageError(UlsamUsageError):
    """An image file is missing or is not an image that can be read."""


class ResultsFileError(UlsamUsageError):
    """A sweep's results file is not one, is damaged, or holds another sweep's results."""
