"""Reading checkpoint files safely and loading them strictly.

:func:`read_state_dict` reads safetensors files and torch files (``torch.save``), never
running pickled code unless asked to (``trust=True``), and unwraps the usual training
wrappers. :func:`load_state_dict_into` checks keys and shapes before it loads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ulsam_inject.errors import CheckpointError, describe, first_line
from ulsam_inject.io.fileio import check_input_file, looks_like_safetensors

__all__ = ["EMA_KEYS", "MODEL_KEYS", "load_state_dict_into", "read_state_dict"]

# Keys under which training scripts nest the model's weights, tried in this order: plain
# weights first (Lightning and timm "state_dict", the PyTorch tutorials'
# "model_state_dict", torchvision's reference scripts, DeiT and detectron2 "model", ...),
# then exponential-moving-average copies, which are used only when no plain weights exist.
MODEL_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
# Prefixes added by wrappers around the model: DataParallel/DistributedDataParallel and
# torch.compile. Stripped (repeatedly, in any nesting) when every key carries one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# torch.save writes a zip archive (PyTorch >= 1.6) or, in the legacy format, a pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
# How torch's weights-only unpickler names a class or function it refused to import, in
# its messages "Unsupported global: GLOBAL a.B ..." and "... unsupported GLOBAL a.b whose
# module a is blocked".
_REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")


def read_state_dict(
    path: str | os.PathLike[str], *, trust: bool = False
) -> dict[str, torch.Tensor]:
    """Read the model weights in a checkpoint file as a flat ``{name: tensor}`` dict on CPU.

    safetensors files are recognised by their header, whatever their suffix. Torch files
    are loaded with ``weights_only=True``; one that holds pickled objects (a whole
    ``nn.Module``, custom classes) is refused unless ``trust=True``, which runs its pickled
    code (only for files you trust) and takes a module's ``state_dict()``.

    A top-level dict is unwrapped under the first key in :data:`MODEL_KEYS`, else
    :data:`EMA_KEYS`, whose value holds tensors; other entries (optimizer state, epoch
    counters) are ignored. ``module.`` and ``_orig_mod.`` prefixes shared by all keys are
    stripped. Every failure raises :class:`CheckpointError` naming the file.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"epoch": 3, "state_dict": {"module.fc.weight": torch.ones(2, 2)}}, path)
        >>> list(read_state_dict(path))
        ['fc.weight']
    """
    target = Path(os.fspath(path))
    size = check_input_file(
        target, kind="checkpoint", expected="a weights file", error=CheckpointError
    )
    try:
        with target.open("rb") as handle:
            head = handle.read(9)
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {target}: {error.strerror}") from None
    if looks_like_safetensors(head):
        loaded: Any = _load_safetensors(target)
    elif target.suffix == ".safetensors" and not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(
            f"checkpoint {target} has a .safetensors suffix but no valid safetensors header "
            f"({size} bytes): it is truncated, corrupt or not a safetensors file"
        )
    else:
        loaded = _load_torch(target, trust)
    return _unwrap(loaded, target)


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` strictly, or change nothing and raise.

    Keys and shapes are checked before any tensor is copied; a mismatch raises one
    :class:`CheckpointError` line with the counts of missing and unexpected keys, a few
    examples of each, and the shape mismatches. ``state_dict`` is not modified.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3)
        >>> load_state_dict_into(model, {"weight": torch.zeros(3, 2), "bias": torch.ones(3)})
        >>> model.bias.tolist()
        [1.0, 1.0, 1.0]
    """
    expected = model.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint entries must be tensors; {len(not_tensors)} are not "
            f"(e.g. {_examples(not_tensors)})"
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{_count(missing, 'missing key')} (e.g. {_examples(missing)})")
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected key')} (e.g. {_examples(unexpected)})")
    if mismatched:
        problems.append(
            f"{_count(mismatched, 'shape mismatch', 'es')}: {'; '.join(mismatched[:3])}"
        )
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit the model ({len(state_dict)} tensors given, "
            f"{len(expected)} expected): {'; '.join(problems)}"
        )
    # Keys and shapes fit, so torch's own strict load should not fail halfway; if it does
    # (a dtype it cannot cast, a custom load hook), restore what was there before.
    backup = {k: v.detach().clone() for k, v in expected.items()}
    given: OrderedDict[str, torch.Tensor] = OrderedDict(state_dict)
    # Module versions travel in a state dict's ``_metadata``; a safetensors file or a plain
    # dict has none, and some modules refuse to load without it (torchvision's MNASNet).
    # Keys and shapes fit this model, so its own versions describe the tensors.
    given._metadata = getattr(state_dict, "_metadata", None) or expected._metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(given, strict=True)
    except Exception as error:
        # Copy straight into the tensors (state_dict() shares their storage), not through
        # load_state_dict, whose hooks may be what failed.
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                tensor.copy_(backup[key])
        raise CheckpointError(f"checkpoint does not fit the model: {describe(error)}") from error


# --- reading ----------------------------------------------------------------------------


def _load_safetensors(target: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(target), device="cpu")
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {target} is a truncated or corrupt safetensors file ({first_line(error)})"
        ) from None


def _load_torch(target: Path, trust: bool) -> Any:
    # argparse.Namespace (the training script's args, saved beside the weights by
    # torchvision's reference scripts and many others) is plain data: allow it.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allow = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
    try:
        # torch warns about pickle protocols and the like; the library never prints.
        # A file object, not the path: torch.load would treat a path ending in
        # ".safetensors" as safetensors, and the header said it is not.
        with warnings.catch_warnings(), allow, target.open("rb") as handle:
            warnings.simplefilter("ignore")
            return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:
        found = _REFUSED_GLOBAL.search(str(error))
        if found is None:
            raise CheckpointError(
                f"checkpoint {target} is not a readable safetensors or torch file: it is "
                f"truncated, corrupt or another format ({_torch_error(error)})"
            ) from None
        if not trust:
            raise CheckpointError(
                f"checkpoint {target} holds pickled code ({found.group(1)}), not just weights; "
                f"loading it runs that code: pass trust=True (--trust-checkpoint) only if "
                f"you trust the file"
            ) from None
    try:
        with warnings.catch_warnings(), target.open("rb") as handle:
            warnings.simplefilter("ignore")
            return torch.load(handle, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(
            f"trusted checkpoint {target} needs code that cannot be imported here "
            f"({describe(error)})"
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"trusted checkpoint {target} could not be unpickled ({describe(error)})"
        ) from None


def _unwrap(loaded: Any, target: Path) -> dict[str, torch.Tensor]:
    found = _find_tensors(loaded, depth=0)
    if not found:
        raise CheckpointError(f"checkpoint {target} holds no weights: {_describe(loaded)}")
    # torch.optim.swa_utils.AveragedModel (torchvision's EMA) adds a step counter beside
    # its "module."-prefixed copy of the model.
    if "n_averaged" in found and all(k.startswith("module.") for k in found if k != "n_averaged"):
        found = {k: v for k, v in found.items() if k != "n_averaged"}
    return _strip_prefixes(found)


def _find_tensors(value: Any, depth: int) -> dict[str, torch.Tensor]:
    if isinstance(value, nn.Module):
        return dict(value.state_dict())
    if not isinstance(value, Mapping) or depth > 3:
        return {}
    for key in (*MODEL_KEYS, *EMA_KEYS):
        inner = value.get(key)
        if isinstance(inner, (Mapping, nn.Module)):
            found = _find_tensors(inner, depth + 1)
            if found:
                return found
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        if not value:
            return "an empty dict"
        keys = [str(k) for k in value]
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        return f"a dict without tensors (keys: {', '.join(keys[:5])}{more})"
    return f"a {type(value).__name__}, not a dict of tensors"


# --- messages ---------------------------------------------------------------------------


def _shape(tensor: torch.Tensor) -> str:
    return f"({', '.join(str(d) for d in tensor.shape)})"


def _count(items: list[str], noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def _examples(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown}, ..." if len(items) > limit else shown


def _torch_error(error: BaseException) -> str:
    """The informative part of a torch.load error: its weights-only preamble says nothing."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().splitlines()
        if detail:
            return f"{type(error).__name__}: {detail[0].strip()[:160]}"
    return f"{describe(error)}"
