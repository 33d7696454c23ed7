"""Saving and loading retrofitted models: weights + recipe, never pickled code.

A file holds the weights of the retrofitted model and its *recipe*: the model spec and
keyword arguments, the plan (stage name, g, mode per block), the input size and the
library versions that made it. Loading rebuilds the graph from the recipe with the same
code path as :func:`ulsam_inject.inject`, then loads the weights strictly.

Two formats: ``.safetensors`` (default; recipe in the header's metadata) and ``.pt``
(a plain dict of tensors and strings, loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import platform
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ulsam_inject.errors import ArtifactError, CheckpointError
from ulsam_inject.io.fileio import atomic_write
from ulsam_inject.surgery.inject import Retrofit, inject

FORMAT = "ulsam-inject/1"
RECIPE_KEY = "ulsam_inject.recipe"


def versions() -> dict[str, str]:
    """Versions of the packages that shape a rebuilt model."""
    found = {"python": platform.python_version()}
    for package in ("ulsam-inject", "torch", "torchvision", "timm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def recipe_of(retrofit: Retrofit, source: str | None = None) -> dict[str, Any]:
    """The recipe that rebuilds ``retrofit``; ``source`` names the model spec if it had none."""
    recipe = retrofit.recipe()
    if source is not None:
        recipe["model"] = source
    if not recipe["model"]:
        raise ArtifactError(
            "cannot save a rebuildable model: it was made from a module object, not a model "
            "spec; pass source='torchvision:NAME', 'timm:NAME' or 'package.module:factory'"
        )
    try:
        json.dumps(recipe["model_kwargs"])
    except TypeError as error:
        raise ArtifactError(f"model keyword arguments must be JSON values: {error}") from None
    return {"format": FORMAT, **recipe, "versions": versions()}


def save(
    retrofit: Retrofit,
    path: str | Path,
    *,
    source: str | None = None,
    force: bool = False,
    protect: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the retrofitted model's weights and recipe to ``path``, atomically.

    The format follows the suffix: ``.pt``/``.pth`` for a torch file, anything else for
    safetensors. An existing file is only replaced with ``force=True``; ``protect`` (e.g.
    the input checkpoint) is never overwritten. ``extra`` adds JSON keys to the recipe
    (e.g. ``{"training": ...}`` from fine-tuning); loading ignores them, and they cannot
    replace the recipe's own keys.

    Example:
        >>> import tempfile, os
        >>> from ulsam_inject import inject, save, load
        >>> result = inject("torchvision:mobilenet_v2", at="features.13")
        >>> path = save(result, os.path.join(tempfile.mkdtemp(), "net.safetensors"))
        >>> load(path).plan.to_list()
        [{'at': 'features.13', 'groups': 4, 'mode': 'after'}]
    """
    recipe = recipe_of(retrofit, source)
    for key, value in (extra or {}).items():
        if key in recipe:
            raise ArtifactError(f"extra recipe key {key!r} would replace the recipe's own")
        recipe[key] = value
    # Shared or non-contiguous tensors are stored as independent copies (safetensors
    # refuses aliasing); loading restores them into the rebuilt modules.
    state = {
        k: v.detach().cpu().contiguous().clone() for k, v in retrofit.model.state_dict().items()
    }
    text = json.dumps(recipe, sort_keys=True)
    target = Path(path)

    if target.suffix in (".pt", ".pth"):

        def write(tmp: Path) -> None:
            torch.save({"format": FORMAT, "recipe": text, "state_dict": state}, tmp)

    else:

        def write(tmp: Path) -> None:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={RECIPE_KEY: text})

    return atomic_write(target, write, force=force, protect=protect)


def read_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The recipe and weights stored in a file written by :func:`save`."""
    from ulsam_inject.io.checkpoints import read_state_dict

    target = Path(path)
    _check_file(target)
    text = _safetensors_recipe(target)
    if text is None:
        text, state = _torch_recipe(target)
    else:
        state = read_state_dict(target)
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{target}: its recipe is not valid JSON ({error})") from None
    _check_recipe(recipe, target)
    return recipe, state


def is_artifact(path: str | Path) -> bool:
    """Does ``path`` look like a file written by :func:`save` (checked cheaply)?"""
    target = Path(path)
    if not target.is_file():
        return False
    try:
        if _safetensors_recipe(target) is not None:
            return True
        _torch_recipe(target)
        return True
    except (ArtifactError, CheckpointError):
        return False


def load(path: str | Path) -> Retrofit:
    """Rebuild a retrofitted model saved by :func:`save` and load its weights strictly.

    The model comes back in eval mode. Example: see :func:`save`.
    """
    from ulsam_inject.io.checkpoints import load_state_dict_into

    recipe, state = read_recipe(path)
    plan = recipe["plan"]
    channels, height, width = (int(v) for v in recipe["input_size"])
    retrofit = inject(
        recipe["model"],
        at=[item["at"] for item in plan],
        groups={item["at"]: item["groups"] for item in plan},
        mode={item["at"]: item["mode"] for item in plan},
        input_size=(channels, height, width),
        model_kwargs=recipe.get("model_kwargs") or {},
    )
    try:
        load_state_dict_into(retrofit.model, state)
    except CheckpointError as error:
        raise ArtifactError(
            f"{path}: its weights do not fit the model its recipe rebuilds ({error}); was it "
            f"written by another version of ulsam-inject or of the model's code?"
        ) from None
    retrofit.model.eval()
    return retrofit


def _check_file(path: Path) -> None:
    """Missing, folder, empty: told plainly before any format is guessed."""
    if not path.exists():
        raise ArtifactError(f"retrofitted-model file {path} does not exist")
    if path.is_dir():
        raise ArtifactError(
            f"{path} is a directory, expected a file written by 'ulsam-inject inject --out'"
        )
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ArtifactError(f"cannot read {path}: {error.strerror}") from None
    if size == 0:
        raise ArtifactError(f"retrofitted-model file {path} is empty (0 bytes)")


def _safetensors_recipe(path: Path) -> str | None:
    """The recipe in a safetensors header, or None when ``path`` is not safetensors."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            size = int.from_bytes(head, "little")
            if size <= 0 or size > 100_000_000:
                return None
            header = handle.read(size)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    if not header.startswith(b"{"):
        return None
    try:
        meta = json.loads(header).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    text = meta.get(RECIPE_KEY)
    if text is None:
        raise ArtifactError(
            f"{path} is a safetensors file without a ulsam-inject recipe: a plain checkpoint "
            f"goes with --checkpoint and a model spec, not as MODEL"
        )
    return str(text)


def _torch_recipe(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        # A file object: torch.load would take a path ending in .safetensors for one.
        with warnings.catch_warnings(), path.open("rb") as handle:
            warnings.simplefilter("ignore")
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ArtifactError(
            f"{path} is not a retrofitted-model file: it is truncated, corrupt or another "
            f"format ({type(error).__name__})"
        ) from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ArtifactError(
            f"{path} holds no ulsam-inject recipe: a plain checkpoint goes with --checkpoint "
            f"and a model spec, not as MODEL"
        )
    state = payload.get("state_dict")
    text = payload.get("recipe")
    if not isinstance(state, Mapping) or not isinstance(text, str):
        raise ArtifactError(f"{path}: the ulsam-inject payload is incomplete")
    return text, dict(state)


def _check_recipe(recipe: Any, path: Path) -> None:
    ok = (
        isinstance(recipe, dict)
        and recipe.get("format") == FORMAT
        and isinstance(recipe.get("model"), str)
        and isinstance(recipe.get("plan"), list)
        and isinstance(recipe.get("input_size"), list)
        and len(recipe["input_size"]) == 3
        and all(isinstance(v, int) and v > 0 for v in recipe["input_size"])
        and all(
            isinstance(item, dict) and {"at", "groups", "mode"} <= set(item)
            for item in recipe["plan"]
        )
    )
    if not ok:
        raise ArtifactError(
            f"{path}: the recipe is not in the {FORMAT} format (needs model, plan, input_size)"
        )


def export_program(
    retrofit: Retrofit,
    path: str | Path,
    *,
    force: bool = False,
    protect: str | Path | None = None,
) -> Path:
    """Write a ``torch.export`` program of the retrofitted model (eval mode, batch 1) atomically.

    Load it with ``torch.export.load(path).module()``; it needs neither this library nor
    the model's source code.
    """
    return write_program(capture_program(retrofit), path, force=force, protect=protect)


def capture_program(retrofit: Retrofit) -> torch.export.ExportedProgram:
    """Capture the retrofitted model (eval mode, batch 1) with ``torch.export``; writes nothing.

    The model's train/eval flags are restored afterwards.
    """
    model = retrofit.model
    flags = [(m, m.training) for m in model.modules()]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    example = torch.randn(1, *retrofit.input_size, dtype=dtype)
    try:
        model.eval()
        return torch.export.export(model, (example,))
    except Exception as error:
        raise ArtifactError(
            f"torch.export could not capture the model: {type(error).__name__}: "
            f"{_first_line(error)}"
        ) from error
    finally:
        for module, flag in flags:
            module.training = flag


def write_program(
    program: torch.export.ExportedProgram,
    path: str | Path,
    *,
    force: bool = False,
    protect: str | Path | None = None,
) -> Path:
    """Write a captured program to ``path`` atomically (see :func:`export_program`)."""

    def write(tmp: Path) -> None:
        torch.export.save(program, tmp)

    return atomic_write(Path(path), write, force=force, protect=protect)


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
