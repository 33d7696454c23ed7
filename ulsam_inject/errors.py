"""One exception hierarchy for the whole library.

Every error the library raises on purpose derives from :class:`UlsamError`. Errors caused by
what the user gave (a position, a group count, a file, a model spec) derive from
:class:`UlsamUsageError`, which is also a :class:`ValueError`; the CLI maps those to exit
code 2 and everything else to exit code 1. Messages say what was given and what is valid.
"""

from __future__ import annotations


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


class DataError(UlsamUsageError):
    """A data folder is missing, empty or malformed, or its classes do not fit the model."""


class ResumeError(UlsamUsageError):
    """A file given to resume from is not a fine-tuning checkpoint of this very run."""


class TrainingError(UlsamError):
    """Training failed on its own terms (e.g. the loss became NaN or infinite)."""
