"""Model sources: parse a model spec, build the model, settle its default input size.

Three kinds of spec name a model factory:

- ``torchvision:NAME``: a builder registered with ``torchvision.models`` (``list_models()``).
- ``timm:NAME``: a timm architecture, optionally with a pretrained tag (``timm:resnet18.a1_in1k``);
  needs the optional ``timm`` package.
- ``package.module:factory``: any importable callable (a function or an ``nn.Module`` class,
  possibly a dotted attribute such as ``pkg.models:Zoo.small``) that returns an ``nn.Module``.

Keyword arguments travel with the spec as JSON values, so that the recipe of a retrofitted
model can rebuild exactly the model that was built. Nothing here downloads anything unless
``pretrained=True`` is asked for.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

from torch import nn

from ulsam_inject.errors import (
    CheckpointError,
    FetchError,
    InputSizeError,
    MissingDependencyError,
    ModelSpecError,
    UlsamError,
    UntrustedRecipeError,
    describe,
    did_you_mean,
)
from ulsam_inject.graph.shapes import DEFAULT_INPUT_SIZE
from ulsam_inject.guards import ECHO_LIMIT, check_input_limits, echo
from ulsam_inject.io.hub import hub_fetch

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "ZOOS",
    "ModelSpec",
    "build_model",
    "default_input_size",
    "parse_input_size",
    "parse_model_spec",
]

ZOOS = ("torchvision", "timm", "callable")

_VALID_SPECS = "'torchvision:NAME', 'timm:NAME' or 'package.module:callable'"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Keyword arguments that would fetch or pick weights behind the caller's back: weights are
# chosen with ``pretrained=`` (``--pretrained``) or a checkpoint file, never through kwargs.
_WEIGHT_KWARGS = {"torchvision": ("weights", "pretrained"), "timm": ("pretrained",)}


def _freeze_kwargs(kwargs: Mapping[str, Any] | None, spec: str) -> Mapping[str, Any]:
    """A read-only, JSON-normalised copy of ``kwargs``.

    The round trip through JSON makes the kwargs used to build a model identical to the
    ones a recipe stores and a later load rebuilds from (tuples become lists, and so on).
    """
    if kwargs is None:
        return MappingProxyType({})
    if not isinstance(kwargs, Mapping):
        raise ModelSpecError(
            f"keyword arguments for {spec} must be a mapping of names to JSON values, "
            f"got {type(kwargs).__name__}"
        )
    bad = [repr(k) for k in kwargs if not (isinstance(k, str) and _IDENTIFIER.fullmatch(k))]
    if bad:
        raise ModelSpecError(
            f"keyword argument names for {spec} must be Python identifiers, got {', '.join(bad)}"
        )
    try:
        normalised = json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ModelSpecError(
            f"keyword arguments for {spec} must be JSON values (numbers, strings, booleans, "
            f"null, lists, objects): {error}"
        ) from None
    return MappingProxyType(normalised)


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec: where the factory lives, its name, and its keyword arguments.

    ``name`` is the model name for the zoos and ``module:attribute`` for a callable.
    ``kwargs`` is a read-only mapping of JSON values.

    Example:
        >>> spec = parse_model_spec("torchvision:mobilenet_v2", {"num_classes": 10})
        >>> spec.spec, dict(spec.kwargs)
        ('torchvision:mobilenet_v2', {'num_classes': 10})
    """

    zoo: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if self.zoo not in ZOOS:
            raise ModelSpecError(
                f"unknown model source {self.zoo!r}; valid sources: {', '.join(ZOOS)}"
            )
        if self.zoo == "callable":
            module_name, _, attribute = self.name.partition(":")
            if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(attribute)):
                raise ModelSpecError(
                    f"a callable model spec is 'package.module:callable', got {self.name!r}"
                )
        elif not self.name:
            raise ModelSpecError(f"a {self.zoo} model spec needs a model name, got ''")
        # Frozen dataclass: normalise the kwargs in place of the caller's (mutable) mapping.
        object.__setattr__(self, "kwargs", _freeze_kwargs(self.kwargs, self.spec))

    @property
    def spec(self) -> str:
        """The canonical spec string, e.g. ``"torchvision:mobilenet_v2"``."""
        return self.name if self.zoo == "callable" else f"{self.zoo}:{self.name}"

    def __hash__(self) -> int:
        # MappingProxyType is unhashable; its sorted JSON text stands in for it.
        return hash((self.zoo, self.name, json.dumps(dict(self.kwargs), sort_keys=True)))


def parse_model_spec(text: str, kwargs: Mapping[str, Any] | None = None) -> ModelSpec:
    """Parse and validate a model spec without building the model.

    Zoo names are checked against the zoo's registry; a callable spec's module is imported
    and its attribute looked up. Raises :class:`ModelSpecError` (or
    :class:`MissingDependencyError` for ``timm:`` without timm installed).

    Example:
        >>> parse_model_spec(" torchvision:mobilenet_v2 ").spec
        'torchvision:mobilenet_v2'
        >>> parse_model_spec("torchvision.models:resnet18").zoo
        'callable'
    """
    if not isinstance(text, str):
        raise ModelSpecError(
            f"a model spec must be a string, got {type(text).__name__}; valid forms: {_VALID_SPECS}"
        )
    stripped = text.strip()
    if not stripped:
        raise ModelSpecError(f"empty model spec; valid forms: {_VALID_SPECS}")
    if ":" not in stripped:
        raise ModelSpecError(_no_source_message(stripped))
    prefix, _, rest = stripped.partition(":")
    prefix, rest = prefix.strip(), rest.strip()
    if not rest:
        raise ModelSpecError(
            f"model spec {text!r} names no model after ':'; valid forms: {_VALID_SPECS}"
        )
    zoo = prefix.lower()
    if zoo == "torchvision":
        return ModelSpec("torchvision", _check_torchvision_name(rest), kwargs or {})
    if zoo == "timm":
        return ModelSpec("timm", _check_timm_name(rest), kwargs or {})
    if not _DOTTED.fullmatch(prefix) or not _DOTTED.fullmatch(rest):
        raise ModelSpecError(
            f"malformed model spec {text!r}; valid forms: {_VALID_SPECS} "
            f"(module and attribute are dotted Python names)"
        )
    _resolve_callable(prefix, rest)
    return ModelSpec("callable", f"{prefix}:{rest}", kwargs or {})


def build_model(spec: ModelSpec | str, *, pretrained: bool = False) -> nn.Module:
    """Build the model a spec names, in eval mode.

    ``pretrained=True`` fetches the zoo's default weights (torchvision ``weights="DEFAULT"``,
    timm ``pretrained=True``); a failed fetch raises :class:`CheckpointError`. Keyword
    arguments the factory rejects raise :class:`ModelSpecError`.

    Example:
        >>> model = build_model("torchvision:mobilenet_v2")
        >>> type(model).__name__, model.training
        ('MobileNetV2', False)
    """
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    for key in _WEIGHT_KWARGS.get(spec.zoo, ()):
        if key in spec.kwargs:
            raise ModelSpecError(
                f"keyword argument {key!r} is not accepted for {spec.spec}: choose weights with "
                f"pretrained=True (--pretrained) or a checkpoint file (--checkpoint FILE)"
            )
    kwargs = dict(spec.kwargs)
    if spec.zoo == "torchvision":
        model = _build_torchvision(spec, kwargs, pretrained)
    elif spec.zoo == "timm":
        model = _build_timm(spec, kwargs, pretrained)
    else:
        if pretrained:
            raise ModelSpecError(
                f"pretrained=True (--pretrained) needs a model zoo, and {spec.spec} is a plain "
                f"callable; load its weights with a checkpoint file (--checkpoint FILE)"
            )
        factory = _resolve_callable(*spec.name.split(":", 1))
        _check_signature(factory, kwargs, spec)
        model = _call_factory(factory, kwargs, spec)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec.spec} returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model.eval()


def default_input_size(spec: ModelSpec | str) -> tuple[int, int, int]:
    """The (C, H, W) input a model was trained at, found without building or downloading.

    timm: the pretrained config's ``input_size`` (``in_chans``/``img_size`` kwargs win).
    torchvision: the crop size of the default weights' image-classification transforms
    (an ``image_size`` kwarg wins). Otherwise (3, 224, 224).

    Example:
        >>> default_input_size("torchvision:efficientnet_b3")
        (3, 300, 300)
        >>> default_input_size("torchvision.models:resnet18")
        (3, 224, 224)
    """
    if isinstance(spec, str):
        spec = parse_model_spec(spec)
    if spec.zoo == "timm":
        return _timm_input_size(spec)
    if spec.zoo == "torchvision":
        return _torchvision_input_size(spec)
    return DEFAULT_INPUT_SIZE


def parse_input_size(text: str) -> tuple[int, int, int]:
    """Parse ``"S"``, ``"HxW"`` or ``"CxHxW"`` into (C, H, W); C defaults to 3.

    Example:
        >>> parse_input_size("224"), parse_input_size("224x160"), parse_input_size("1x64x64")
        ((3, 224, 224), (3, 224, 160), (1, 64, 64))
    """
    valid = "valid forms: S, HxW or CxHxW with positive integers, e.g. 224, 224x160, 3x224x224"
    if not isinstance(text, str):
        raise InputSizeError(f"input size must be text, got {type(text).__name__}; {valid}")
    parts = [part.strip() for part in re.split("[xX\u00d7]", text.strip())]
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"[0-9]+", part) for part in parts):
        raise InputSizeError(f"input size {echo(text)} is malformed; {valid}")
    numbers = [int(part) for part in parts]
    if any(number <= 0 for number in numbers):
        raise InputSizeError(f"input size {echo(text)} has a zero dimension; {valid}")
    size = (
        (3, numbers[0], numbers[0])
        if len(numbers) == 1
        else (3, numbers[0], numbers[1])
        if len(numbers) == 2
        else (numbers[0], numbers[1], numbers[2])
    )
    check_input_limits(size)
    return size


# --- torchvision ------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models())


def _check_torchvision_name(name: str) -> str:
    # torchvision's registry lower-cases names on lookup; the canonical spec does too.
    canonical = name.lower()
    names = _torchvision_names()
    if canonical not in names:
        raise ModelSpecError(
            f"unknown torchvision model {name!r}{_did_you_mean(canonical, names)}; "
            f"list the valid names with torchvision.models.list_models()"
        )
    return canonical


def _build_torchvision(spec: ModelSpec, kwargs: dict[str, Any], pretrained: bool) -> Any:
    import torchvision

    weights = None
    if pretrained:
        try:
            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
        except (ValueError, AttributeError, KeyError):
            raise CheckpointError(
                f"torchvision has no pretrained weights for {spec.spec}; load weights with "
                f"--checkpoint FILE"
            ) from None
        # Fetch (or read from the torch hub cache) first, apart from building, so that a
        # network or cache failure is told apart from a bad keyword argument. torch.hub
        # downloads to a temporary file and renames it only once complete and hash-checked,
        # so a failure leaves no partial file in the cache.
        try:
            weights.get_state_dict(progress=False, check_hash=True)
        except Exception as error:
            raise _fetch_error(spec, error) from error
    return _call_factory(
        lambda **kw: torchvision.models.get_model(spec.name, weights=weights, **kw), kwargs, spec
    )


def _torchvision_input_size(spec: ModelSpec) -> tuple[int, int, int]:
    image_size = spec.kwargs.get("image_size")
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (3, image_size, image_size)
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    try:
        # Building the transforms preset only reads the weights' metadata: no download.
        transforms = torchvision.models.get_model_weights(spec.name).DEFAULT.transforms()
    except Exception:
        return DEFAULT_INPUT_SIZE
    # Only classification presets crop a 2-D image; video, detection and segmentation
    # presets either take other inputs or keep the image size.
    if not isinstance(transforms, ImageClassification):
        return DEFAULT_INPUT_SIZE
    return _three(transforms.crop_size, channels=3)


# --- timm -------------------------------------------------------------------------------


def _import_timm() -> ModuleType:
    try:
        import timm
    except ModuleNotFoundError as error:
        if error.name == "timm":
            raise MissingDependencyError(
                'timm models need the optional timm package: pip install "ulsam-inject[timm]"'
            ) from None
        raise MissingDependencyError(
            f"timm is installed but cannot be imported ({error}); reinstall it with "
            f'pip install "ulsam-inject[timm]"'
        ) from None
    except ImportError as error:
        raise MissingDependencyError(
            f"timm is installed but cannot be imported ({error}); reinstall it with "
            f'pip install "ulsam-inject[timm]"'
        ) from None
    return timm


def _check_timm_name(name: str) -> str:
    timm = _import_timm()
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise ModelSpecError(
            f"unknown timm model {name!r}{_did_you_mean(architecture, timm.list_models())}; "
            f"list the valid names with timm.list_models()"
        )
    if tag:
        tagged = list(timm.list_pretrained(f"{architecture}.*"))
        if name not in tagged:
            valid = ", ".join(tagged) if tagged else "none"
            raise ModelSpecError(
                f"unknown pretrained tag {tag!r} for timm model {architecture!r}; valid: {valid}"
            )
    return name


def _build_timm(spec: ModelSpec, kwargs: dict[str, Any], pretrained: bool) -> Any:
    timm = _import_timm()
    if not pretrained:
        return _call_factory(
            lambda **kw: timm.create_model(spec.name, pretrained=False, **kw), kwargs, spec
        )
    with hub_fetch() as unreachable:
        try:
            return timm.create_model(spec.name, pretrained=True, **kwargs)
        except (TypeError, ValueError) as error:
            raise _kwargs_error(spec, kwargs, error) from error
        except (OSError, RuntimeError) as error:
            # OSError covers urllib, requests and huggingface_hub failures; RuntimeError a
            # corrupt download or weights that do not fit the kwargs-shaped model.
            why = "the Hugging Face Hub is unreachable, and its local cache" if unreachable else ""
            raise _fetch_error(spec, error, why) from error


def _timm_input_size(spec: ModelSpec) -> tuple[int, int, int]:
    timm = _import_timm()
    size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    try:
        # The registry's config for the (tagged) name: metadata only, no download.
        cfg = timm.models.get_pretrained_cfg(spec.name)
    except Exception:
        cfg = None
    input_size = getattr(cfg, "input_size", None)
    if isinstance(input_size, (tuple, list)) and len(input_size) == 3:
        size = _three(input_size[1:], channels=int(input_size[0]))
    channels = spec.kwargs.get("in_chans")
    if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0:
        size = (channels, size[1], size[2])
    img_size = spec.kwargs.get("img_size")
    if isinstance(img_size, int) and not isinstance(img_size, bool) and img_size > 0:
        size = (size[0], img_size, img_size)
    elif (
        isinstance(img_size, list)
        and len(img_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in img_size)
    ):
        size = (size[0], img_size[0], img_size[1])
    return size


# --- callables --------------------------------------------------------------------------


def _resolve_callable(module_name: str, attribute: str) -> Callable[..., Any]:
    spec = f"{module_name}:{attribute}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise ModelSpecError(
                f"cannot import module {module_name!r} of model spec {spec!r}: no module "
                f"named {missing!r} (is it installed or on PYTHONPATH?)"
            ) from None
        raise ModelSpecError(
            f"importing module {module_name!r} of model spec {spec!r} failed: {error}"
        ) from error
    except Exception as error:
        raise ModelSpecError(
            f"importing module {module_name!r} of model spec {spec!r} failed: {describe(error)}"
        ) from error
    target: Any = module
    walked: list[str] = []
    for part in attribute.split("."):
        if not hasattr(target, part):
            owner = f"{module_name}:{'.'.join(walked)}" if walked else f"module {module_name}"
            public = [n for n in dir(target) if not n.startswith("_")]
            raise ModelSpecError(
                f"{owner!s} has no attribute {part!r} (model spec {spec!r})"
                f"{_did_you_mean(part, public)}"
            )
        target = getattr(target, part)
        walked.append(part)
    if not callable(target):
        raise ModelSpecError(
            f"{spec!r} is a {type(target).__name__}, not a callable that returns a torch.nn.Module"
        )
    return target


def _check_signature(factory: Callable[..., Any], kwargs: dict[str, Any], spec: ModelSpec) -> None:
    """Reject unknown keyword arguments before calling, when the signature says enough."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ModelSpecError(
            f"{spec.spec} does not accept keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )


def _call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], spec: ModelSpec) -> Any:
    try:
        return factory(**kwargs)
    except UlsamError:
        raise
    except (TypeError, ValueError, AssertionError) as error:
        # Factories signal bad arguments with these (torchvision's builders check values
        # with ValueError and forward unknown kwargs into a class that raises TypeError).
        raise _kwargs_error(spec, kwargs, error) from error
    except RuntimeError as error:
        # With keyword arguments, a failure while building is theirs (num_classes=-1:
        # "Trying to create tensor with negative dimension"); without, it is the model's.
        if not kwargs:
            raise
        raise _kwargs_error(spec, kwargs, error) from error


# --- messages ---------------------------------------------------------------------------


def _kwargs_error(spec: ModelSpec, kwargs: Mapping[str, Any], error: Exception) -> ModelSpecError:
    given = json.dumps(dict(kwargs), sort_keys=True) if kwargs else "no keyword arguments"
    given = given if len(given) <= 2 * ECHO_LIMIT else given[: 2 * ECHO_LIMIT] + "..."
    return ModelSpecError(f"building {spec.spec} with {given} failed: {describe(error)}")


def _fetch_error(spec: ModelSpec, error: Exception, where: str = "") -> FetchError:
    source = f" ({where} has no copy)" if where else ""
    return FetchError(
        f"the pretrained weights of {spec.spec} could not be fetched or read{source} "
        f"({describe(error)}); download them elsewhere and pass "
        f"--checkpoint FILE"
    )


def _did_you_mean(name: str, candidates: list[str]) -> str:
    hint = did_you_mean(name, candidates)
    return f" ({hint})" if hint else ""


def _no_source_message(text: str) -> str:
    hint = ""
    if text.lower() in _torchvision_names():
        hint = f"; did you mean 'torchvision:{text.lower()}'?"
    else:
        try:
            timm = _import_timm()
        except MissingDependencyError:
            timm = None
        if timm is not None and timm.is_model(text.partition(".")[0]):
            hint = f"; did you mean 'timm:{text}'?"
    return f"model spec {text!r} names no source; valid forms: {_VALID_SPECS}{hint}"


def _three(values: Any, *, channels: int) -> tuple[int, int, int]:
    """(C, H, W) from a torchvision/timm size: one side for a square, or (H, W)."""
    sides = [int(v) for v in values]
    if len(sides) == 1:
        return (channels, sides[0], sides[0])
    if len(sides) == 2:
        return (channels, sides[0], sides[1])
    return DEFAULT_INPUT_SIZE


# --- specs read from files --------------------------------------------------------------

# Keyword arguments that reach the network or other files (weights, configs, caches): a
# recipe read from a file may not pass them, at any depth, unless the user trusts the file.
_REACHING_KWARG = re.compile(
    r"(pretrained.*|weights.*|.*checkpoint.*|.*_path|.*_file|.*_dir|.*url.*|hf_hub.*|cache.*"
    r"|file|path|dir|model_dir|filename)",
    re.IGNORECASE,
)
# String values that name a place rather than a setting: URLs and timm's hub prefixes.
_REACHING_VALUE = re.compile(r"://|^(hf-hub|hf_hub|local-dir|file):", re.IGNORECASE)
_ZOO_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_file_spec(text: Any, kwargs: Any, *, origin: str, trust: bool = False) -> None:
    """Refuse a model spec read from a file (``origin``) that could run code or reach out.

    A file may name only ``torchvision:NAME`` or ``timm:NAME`` with JSON keyword
    arguments, none of which reach the network or other files (``pretrained``,
    ``weights``, ``checkpoint_path``, ``pretrained_cfg_overlay``, URLs, ...). With
    ``trust=True`` (``--trust-recipe``) everything a typed spec may do is allowed.
    Raises :class:`~ulsam_inject.errors.UntrustedRecipeError`; nothing is imported.

    Example:
        >>> check_file_spec("torchvision:mobilenet_v2", {"num_classes": 10}, origin="m.pt")
        >>> check_file_spec("os:system", {}, origin="m.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ulsam_inject.errors.UntrustedRecipeError: m.pt: its recipe names the callable ...
    """
    if trust:
        return
    allow = "pass --trust-recipe (API: trust_recipe=True) only if you trust the file"
    if not isinstance(text, str):
        raise UntrustedRecipeError(
            f"{origin}: its recipe's field 'model' is a {type(text).__name__}, expected a "
            f"model spec string"
        )
    prefix, _, name = text.strip().partition(":")
    if prefix.strip().lower() not in ("torchvision", "timm"):
        raise UntrustedRecipeError(
            f"{origin}: its recipe names the callable {echo(text)}, and building it would "
            f"import and run code; a file may only name torchvision:NAME or timm:NAME models: "
            f"{allow}"
        )
    if not _ZOO_NAME.fullmatch(name.strip()):
        raise UntrustedRecipeError(
            f"{origin}: its recipe names the model {echo(text)}, which is not a plain zoo name "
            f"(hub and file prefixes reach the network or other files): {allow}"
        )
    found = _reaching(kwargs, "model_kwargs")
    if found is not None:
        raise UntrustedRecipeError(
            f"{origin}: its recipe passes {found} to {echo(text)}, which can reach the network "
            f"or other files; a file may only pass plain settings: {allow}"
        )


def _reaching(value: Any, where: str, depth: int = 0) -> str | None:
    """The first key or value under ``value`` that reaches out, described; else None."""
    if depth > 32:
        return f"{where} nested over 32 levels deep"
    if isinstance(value, Mapping):
        for key, inner in value.items():
            if isinstance(key, str) and _REACHING_KWARG.fullmatch(key):
                return f"keyword argument {echo(key)} (in {where})"
            found = _reaching(inner, f"{where}.{key}", depth + 1)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            found = _reaching(inner, f"{where}[{index}]", depth + 1)
            if found is not None:
                return found
    elif isinstance(value, str) and _REACHING_VALUE.search(value):
        return f"the value {echo(value)} (in {where})"
    return None
