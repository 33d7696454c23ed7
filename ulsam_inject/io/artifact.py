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
from torch import nn

from ulsam_inject.block.module import ULSAM
from ulsam_inject.errors import (
    ArtifactError,
    CheckpointError,
    OutputError,
    RecipeVersionError,
    describe,
)
from ulsam_inject.graph.modes import eval_mode
from ulsam_inject.guards import MAX_INPUT_SIDE, echo
from ulsam_inject.io.fileio import atomic_write, check_input_file, read_safetensors_header
from ulsam_inject.surgery.inject import Retrofit, inject
from ulsam_inject.surgery.plan import module_name_for

FORMAT = "ulsam-inject/1"
READABLE_FORMATS = (FORMAT,)
"""The recipe format versions this release reads."""
RECIPE_KEY = "ulsam_inject.recipe"
SUFFIXES = (".safetensors", ".pt", ".pth")
"""The file suffixes :func:`save` writes: safetensors, or a torch file."""


def versions() -> dict[str, str]:
    """Versions of the packages that shape a rebuilt model."""
    found = {"python": platform.python_version()}
    for package in ("ulsam-inject", "torch", "torchvision", "timm"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def recipe_of(
    model: Retrofit | nn.Module,
    source: str | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """The recipe that rebuilds ``model``: a :class:`Retrofit`'s own, or, for a bare module,
    one derived from the ULSAM blocks it holds. ``source``, ``model_kwargs`` and
    ``input_size`` override (or, for a bare module, give) the spec, its keyword arguments
    and the input size."""
    if isinstance(model, Retrofit):
        recipe = model.recipe()
    else:
        recipe = {
            "model": None,
            "model_kwargs": {},
            "input_size": None,
            "plan": plan_of(model),
        }
    if source is not None:
        recipe["model"] = source
    if model_kwargs is not None:
        recipe["model_kwargs"] = dict(model_kwargs)
    if not recipe["model"]:
        raise ArtifactError(
            "cannot save a rebuildable model: it was made from a module object, not a model "
            "spec; pass source='torchvision:NAME', 'timm:NAME' or 'package.module:factory'"
        )
    try:
        json.dumps(recipe["model_kwargs"])
    except TypeError as error:
        raise ArtifactError(f"model keyword arguments must be JSON values: {error}") from None
    if input_size is not None:
        recipe["input_size"] = list(input_size)
    elif recipe["input_size"] is None:
        from ulsam_inject.io.sources import default_input_size, parse_model_spec

        spec = parse_model_spec(recipe["model"], recipe["model_kwargs"])
        recipe["input_size"] = list(default_input_size(spec))
    return {"format": FORMAT, **recipe, "versions": versions()}


def plan_of(model: nn.Module) -> list[dict[str, Any]]:
    """The recipe's plan read from the ULSAM blocks ``model`` holds, in module order.

    Each block put in by :func:`ulsam_inject.inject` knows its stage and whether it
    replaced it; a model with no block, or with a block built by hand, has no plan
    (:class:`ArtifactError`).
    """
    plan = []
    for name, module in model.named_modules():
        if not isinstance(module, ULSAM):
            continue
        if module.placed_at is None:
            raise ArtifactError(
                f"the ULSAM block at {name!r} was not put in by inject, so the stage it "
                f"belongs to is unknown; retrofit the model with ulsam_inject.inject"
            )
        mode = "replace" if module.replaces_stage else "after"
        plan.append({"at": module.placed_at, "groups": module.groups, "mode": mode})
    if not plan:
        raise ArtifactError(
            "the model holds no ULSAM block: there is no retrofit to save; save a plain "
            "model with torch.save(model.state_dict(), path) or safetensors instead"
        )
    return plan


def save(
    model: Retrofit | nn.Module,
    path: str | Path,
    *,
    source: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    input_size: tuple[int, int, int] | None = None,
    force: bool = False,
    protect: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a retrofitted model's weights and recipe to ``path``, atomically.

    ``model`` is a :class:`Retrofit` or the retrofitted ``nn.Module`` itself (its recipe is
    then read from the ULSAM blocks it holds; ``source`` names the model spec it was built
    from, ``model_kwargs`` the factory's keyword arguments, ``input_size`` defaults to the
    spec's own). Before anything is written, the model the recipe rebuilds is compared with
    ``model``: a model changed since (``reset_classifier(10)``, a new head) is refused
    (:class:`ArtifactError`) with the first key that differs and the factory keyword that
    likely rebuilds it (``model_kwargs={"num_classes": 10}``). So a saved file always loads.

    The format follows the suffix: ``.pt``/``.pth`` for a torch file, ``.safetensors``
    for safetensors; any other suffix is refused (:class:`OutputError`). An existing file
    is only replaced with ``force=True``; ``protect`` (e.g. the input checkpoint) is never
    overwritten. ``extra`` adds JSON keys to the recipe (e.g. ``{"training": ...}`` from
    fine-tuning); loading ignores them, and they cannot replace the recipe's own keys.

    Example:
        >>> import tempfile, os
        >>> from ulsam_inject import inject, save, load, read_recipe
        >>> result = inject("torchvision:mobilenet_v2", at="features.13")
        >>> path = save(result.model, os.path.join(tempfile.mkdtemp(), "net.safetensors"),
        ...             source="torchvision:mobilenet_v2")
        >>> type(load(path)).__name__, read_recipe(path)["plan"]
        ('MobileNetV2', [{'at': 'features.13', 'groups': 4, 'mode': 'after'}])
    """
    check_suffix(path)
    recipe = recipe_of(model, source, model_kwargs=model_kwargs, input_size=input_size)
    for key, value in (extra or {}).items():
        if key in recipe:
            raise ArtifactError(f"extra recipe key {key!r} would replace the recipe's own")
        recipe[key] = value
    module = model.model if isinstance(model, Retrofit) else model
    # Shared or non-contiguous tensors are stored as independent copies (safetensors
    # refuses aliasing); loading restores them into the rebuilt modules.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    check_rebuilds(recipe, state)
    text = json.dumps(recipe, sort_keys=True)
    target = Path(path)

    if target.suffix in (".pt", ".pth"):

        def write(tmp: Path) -> None:
            # Through a Python file object, so that a full disk is an OSError with its errno.
            with tmp.open("wb") as handle:
                torch.save({"format": FORMAT, "recipe": text, "state_dict": state}, handle)

    else:

        def write(tmp: Path) -> None:
            from safetensors.torch import save_file

            try:
                save_file(state, str(tmp), metadata={RECIPE_KEY: text})
            except Exception as error:
                raise _as_os_error(error) from error

    return atomic_write(target, write, force=force, protect=protect)


def check_rebuilds(recipe: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse ``state`` unless the model ``recipe`` rebuilds has the same keys and shapes.

    The message names the first difference and, where the model's classifier differs, the
    ``num_classes`` keyword that would rebuild it.
    """
    rebuilt = _rebuild(recipe).model
    expected = rebuilt.state_dict()
    order = list(state) + [k for k in expected if k not in state]
    for key in order:
        mine, theirs = state.get(key), expected.get(key)
        if mine is not None and theirs is not None and mine.shape == theirs.shape:
            continue
        what = (
            f"{key!r} is {_shape(mine)} in the model but {_shape(theirs)} in the model the "
            f"recipe rebuilds ({recipe['model']} with model_kwargs="
            f"{json.dumps(recipe.get('model_kwargs') or {})})"
        )
        hint = _likely_kwargs(rebuilt, key, mine, recipe.get("model_kwargs") or {})
        raise ArtifactError(
            f"cannot save: the model no longer matches its recipe: {what}; "
            + (f"pass model_kwargs={hint}" if hint else "rebuild it from a model spec")
        )


def _shape(tensor: torch.Tensor | None) -> str:
    return "absent" if tensor is None else str(list(tensor.shape))


def _likely_kwargs(
    rebuilt: nn.Module, key: str, mine: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> str | None:
    """The factory keywords that likely rebuild a model whose ``key`` differs: the class
    count, when ``key`` belongs to the rebuilt model's last Linear (its classifier)."""
    linears = [name for name, m in rebuilt.named_modules() if isinstance(m, nn.Linear)]
    if not linears or not key.startswith(linears[-1] + "."):
        return None
    classes = 0 if mine is None else int(mine.shape[0])
    return json.dumps({**kwargs, "num_classes": classes})


def check_suffix(path: str | Path) -> None:
    """Refuse an output suffix :func:`save` does not write (:class:`OutputError`)."""
    suffix = Path(path).suffix
    if suffix.lower() not in SUFFIXES:
        raise OutputError(
            f"output {echo(str(path))}: a retrofitted model is written as .safetensors or .pt "
            f"(.pth), got {echo(suffix) if suffix else 'no suffix'}"
        )


def read_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The recipe and weights stored in a file written by :func:`save`.

    Reading is data only: the recipe's types are checked, nothing it names is imported.
    """
    from ulsam_inject.io.checkpoints import read_state_dict

    target = Path(path)
    _check_file(target)
    text = _safetensors_recipe(target)
    if text is None:
        text, state = _torch_recipe(target)
    else:
        state = read_state_dict(target)
    return _parse_recipe(text, target), state


def _parse_recipe(text: str, target: Path) -> dict[str, Any]:
    try:
        recipe = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ArtifactError(f"{target}: its recipe is not valid JSON ({error})") from None
    _check_recipe(recipe, target)
    return dict(recipe)


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


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe of a file written by :func:`save`, checked, without building anything.

    Keys: ``model`` (the spec), ``model_kwargs``, ``input_size`` ([C, H, W]), ``plan``
    (``[{"at": stage, "groups": g, "mode": "after"|"replace"}, ...]``), ``format``,
    ``versions``, plus any ``extra`` given to :func:`save` (``training`` after fine-tuning).
    For safetensors only the header is read. Example: see :func:`save`.
    """
    target = Path(path)
    _check_file(target)
    text = _safetensors_recipe(target)
    if text is None:
        text, _ = _torch_recipe(target)
    return _parse_recipe(text, target)


def load(path: str | Path, *, trust_recipe: bool = False) -> nn.Module:
    """The retrofitted model saved in ``path``: the class its spec builds, weights loaded,
    in eval mode. :func:`read_recipe` tells how it was made; :func:`load_retrofit` gives
    the whole :class:`Retrofit` (plan, stages, cost report).

    A file is data: its recipe may only name ``torchvision:NAME`` or ``timm:NAME`` with
    keyword arguments that reach neither the network nor other files; anything else (a
    ``package.module:callable``, ``pretrained``, ``checkpoint_path``, ...) raises
    :class:`UntrustedRecipeError` before anything is imported, unless ``trust_recipe=True``
    (only for files you trust: it runs code). Files written by earlier releases load too.
    Example: see :func:`save`.
    """
    return load_retrofit(path, trust_recipe=trust_recipe).model


def load_retrofit(path: str | Path, *, trust_recipe: bool = False) -> Retrofit:
    """Rebuild the :class:`Retrofit` saved in ``path`` and load its weights strictly.

    As :func:`load` (same checks of the recipe), with the plan, stages and cost report.
    """
    from ulsam_inject.io.checkpoints import load_state_dict_into
    from ulsam_inject.io.sources import check_file_spec

    recipe, state = read_artifact(path)
    check_file_spec(
        recipe["model"], recipe.get("model_kwargs"), origin=str(path), trust=trust_recipe
    )
    retrofit = _rebuild(recipe, report=True)
    try:
        load_state_dict_into(retrofit.model, _moved_block_keys(state, retrofit))
    except CheckpointError as error:
        raise ArtifactError(
            f"{path}: its weights do not fit the model its recipe rebuilds ({error}); was it "
            f"written by another version of ulsam-inject or of the model's code?"
        ) from None
    retrofit.model.eval()
    return retrofit


def _rebuild(recipe: Mapping[str, Any], *, report: bool = False) -> Retrofit:
    """The retrofit ``recipe`` describes, with fresh blocks."""
    plan = recipe["plan"]
    channels, height, width = (int(v) for v in recipe["input_size"])
    return inject(
        recipe["model"],
        at=[item["at"] for item in plan],
        groups={item["at"]: item["groups"] for item in plan},
        mode={item["at"]: item["mode"] for item in plan},
        input_size=(channels, height, width),
        model_kwargs=recipe.get("model_kwargs") or {},
        report=report,
    )


def _moved_block_keys(
    state: dict[str, torch.Tensor], retrofit: Retrofit
) -> dict[str, torch.Tensor]:
    """``state`` with blocks saved where earlier releases put them, under the model's
    ``ulsam`` container (``ulsam.features_13.*``), moved to where they live now
    (``features.13.ulsam.*``): older files keep loading."""
    moves = {
        module_name_for(p.stage.name) + ".": p.module_name + "."
        for p in retrofit.plan.placements
        if p.module_name != module_name_for(p.stage.name)
    }
    if not moves or not any(k.startswith(tuple(moves)) for k in state):
        return state
    moved = {}
    for key, value in state.items():
        old = next((o for o in moves if key.startswith(o)), None)
        moved[moves[old] + key[len(old) :] if old else key] = value
    return moved


def _check_file(path: Path) -> None:
    """Missing, folder, unreadable, empty: told plainly before any format is guessed."""
    check_input_file(
        path,
        kind="retrofitted-model file",
        expected="a file written by 'ulsam-inject inject --out'",
        error=ArtifactError,
    )


def _safetensors_recipe(path: Path) -> str | None:
    """The recipe in a safetensors header, or None when ``path`` is not safetensors."""
    try:
        header = read_safetensors_header(path)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    if header is None:
        return None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ArtifactError(
            f"{path}: field '__metadata__' of its safetensors header is a {_kind(meta)}, "
            f"expected an object of strings"
        )
    text = meta.get(RECIPE_KEY)
    if text is None:
        raise ArtifactError(
            f"{path} is a safetensors file without a ulsam-inject recipe: a plain checkpoint "
            f"goes with --checkpoint and a model spec, not as MODEL"
        )
    if not isinstance(text, str):
        raise ArtifactError(
            f"{path}: field '__metadata__.{RECIPE_KEY}' is a {_kind(text)}, expected a JSON string"
        )
    return text


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
    found = payload.get("format") if isinstance(payload, Mapping) else None
    if isinstance(found, str) and found.startswith("ulsam-inject/") and found != FORMAT:
        raise _version_error(path, found)
    if not isinstance(payload, Mapping) or found != FORMAT:
        raise ArtifactError(
            f"{path} holds no ulsam-inject recipe: a plain checkpoint goes with --checkpoint "
            f"and a model spec, not as MODEL"
        )
    state = payload.get("state_dict")
    text = payload.get("recipe")
    if not isinstance(text, str):
        raise ArtifactError(
            f"{path}: field 'recipe' of the ulsam-inject payload is "
            f"{'missing' if text is None else 'a ' + _kind(text)}, expected a JSON string"
        )
    if not isinstance(state, Mapping):
        raise ArtifactError(
            f"{path}: field 'state_dict' of the ulsam-inject payload is "
            f"{'missing' if state is None else 'a ' + _kind(state)}, expected a dict of tensors"
        )
    return text, dict(state)


def _check_recipe(recipe: Any, path: Path) -> None:
    """Every field of a recipe has its type, or one :class:`ArtifactError` names the field."""
    if not isinstance(recipe, dict):
        raise ArtifactError(f"{path}: its recipe is a {_kind(recipe)}, expected an object")
    found = recipe.get("format")
    if found != FORMAT:
        if isinstance(found, str) and found.startswith("ulsam-inject/"):
            raise _version_error(path, found)
        raise ArtifactError(
            f"{path}: the recipe is not in the {FORMAT} format (field 'format' is "
            f"{echo(found)}; needs model, plan, input_size)"
        )

    def bad(field: str, value: Any, expected: str) -> ArtifactError:
        got = "missing" if value is None else f"{echo(value)} (a {_kind(value)})"
        return ArtifactError(f"{path}: recipe field '{field}' is {got}, expected {expected}")

    if not isinstance(recipe.get("model"), str):
        raise bad("model", recipe.get("model"), "a model spec string")
    kwargs = recipe.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("model_kwargs", kwargs, "an object of keyword arguments")
    size = recipe.get("input_size")
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(_is_int(v) and 0 < v <= MAX_INPUT_SIDE for v in size)
    ):
        raise bad("input_size", size, f"[C, H, W] of integers from 1 to {MAX_INPUT_SIDE}")
    plan = recipe.get("plan")
    if not isinstance(plan, list) or not plan:
        raise bad("plan", plan, "a non-empty list of {at, groups, mode} objects")
    for index, item in enumerate(plan):
        where = f"plan[{index}]"
        if not isinstance(item, dict):
            raise bad(where, item, "an object with at, groups, mode")
        if not isinstance(item.get("at"), str):
            raise bad(f"{where}.at", item.get("at"), "a stage name")
        if not (_is_int(item.get("groups")) and item["groups"] > 0):
            raise bad(f"{where}.groups", item.get("groups"), "a positive integer")
        if item.get("mode") not in ("after", "replace"):
            raise bad(f"{where}.mode", item.get("mode"), "'after' or 'replace'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    """The JSON name of a value's type, as a message says it."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _version_error(path: Path, found: str) -> RecipeVersionError:
    return RecipeVersionError(
        f"{path}: field 'format' is {echo(found)}, a format this release of ulsam-inject does "
        f"not read (it reads {', '.join(READABLE_FORMATS)}); upgrade ulsam-inject to load it"
    )


def _as_os_error(error: Exception) -> Exception:
    """safetensors reports I/O failures as text ("(os error 28)", "Os { code: 28"): its OSError."""
    import errno
    import os
    import re

    found = re.search(r"(?:Os \{ code: |\(os error )(\d+)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code) if code else errno.errorcode.get(code, "I/O error"))


EXAMPLE_BATCH = 2
"""The batch a program is captured at. torch.export specializes a dimension seen as 0 or 1
to that constant, so the example batch is 2; the program then takes any batch from 1 up."""


def export_program(
    retrofit: Retrofit,
    path: str | Path,
    *,
    force: bool = False,
    protect: str | Path | None = None,
) -> Path:
    """Write a ``torch.export`` program of the retrofitted model (eval mode) atomically.

    The batch dimension is dynamic (any batch from 1 up); channels, height and width are
    the retrofit's input size. Load it with ``torch.export.load(path).module()``; it needs
    neither this library nor the model's source code.
    """
    return write_program(capture_program(retrofit), path, force=force, protect=protect)


def example_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    """A random batch of :data:`EXAMPLE_BATCH` in the dtype of ``model``'s parameters."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.randn(EXAMPLE_BATCH, *input_size, dtype=dtype)


def batch_dynamic_shapes() -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for one image-batch argument whose batch dimension is free (min 1)."""
    return ({0: torch.export.Dim("batch", min=1)},)


def capture_program(retrofit: Retrofit) -> torch.export.ExportedProgram:
    """Capture the retrofitted model (eval mode, dynamic batch) with ``torch.export``.

    Writes nothing. The model's train/eval flags are restored afterwards.
    """
    model = retrofit.model
    example = example_input(model, retrofit.input_size)
    try:
        with eval_mode(model):
            return torch.export.export(model, (example,), dynamic_shapes=batch_dynamic_shapes())
    except Exception as error:
        raise ArtifactError(
            f"torch.export could not capture the model: "
            f"{describe(error, limit=200, sentence=False)}"
        ) from error


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
