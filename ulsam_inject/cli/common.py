"""What the commands share: consoles, model loading, option parsing, JSON output."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from torch import nn

from ulsam_inject.errors import CheckpointError, ModelSpecError, UlsamUsageError
from ulsam_inject.guards import echo

# Piped output has no terminal width; rich would fold tables to 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)

MODEL_HELP = (
    "torchvision:NAME, timm:NAME, package.module:factory, or a file written by "
    "'inject --out' (rebuilds the retrofitted model)."
)
CheckpointOption = typer.Option(
    None, "--checkpoint", "-c", help="Weights to load: a state dict (.pt/.pth) or .safetensors."
)
TrustOption = typer.Option(
    False, "--trust-checkpoint", help="Allow a checkpoint that holds pickled code (runs it!)."
)
TrustRecipeOption = typer.Option(
    False,
    "--trust-recipe",
    help="Allow a MODEL file whose recipe names a package.module:callable or arguments that "
    "reach the network or files (imports and runs code!).",
)
PretrainedOption = typer.Option(
    False, "--pretrained", help="Fetch the zoo's pretrained weights (needs the network)."
)
KwargsOption = typer.Option(
    None,
    "--model-kwargs",
    help="Keyword arguments for the model factory, as JSON: '{\"num_classes\": 10}'",
)
InputSizeOption = typer.Option(
    None, "--input-size", "-s", help="224 or HxW (e.g. 224x160); default: the model's own."
)
JsonOption = typer.Option(False, "--json", help="Print one JSON document on stdout.")
InitOption = typer.Option(
    None,
    "--init",
    help="How new blocks start: default (PyTorch's init) or uniform (flat attention map: "
    "each block starts as x * (1 + 1/(H*W))).",
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the commands, and where it came from."""

    module: nn.Module
    source: str | None
    source_kwargs: dict[str, Any]
    input_size: tuple[int, int, int]
    retrofit: Any = None  # a Retrofit when MODEL was a file written by --out


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelSpecError(
            f"--model-kwargs is not valid JSON ({error.msg}): {echo(text)}"
        ) from None
    if not isinstance(value, dict):
        raise ModelSpecError(f"--model-kwargs must be a JSON object, got {echo(text)}")
    return value


def looks_like_file(model: str) -> bool:
    """A MODEL argument that names a file rather than a spec.

    A zoo spec is never a file, even with a ``/`` (``timm:hf-hub:timm/NAME``).
    """
    if model.startswith(("torchvision:", "timm:")):
        return False
    path = Path(model)
    return path.suffix in (".safetensors", ".pt", ".pth") or path.exists() or "/" in model


def load_model(
    model: str,
    *,
    checkpoint: Path | None = None,
    trust: bool = False,
    pretrained: bool = False,
    kwargs_text: str | None = None,
    input_size: str | None = None,
    trust_recipe: bool = False,
) -> LoadedModel:
    """Resolve MODEL (spec or retrofitted file), load weights, settle the input size.

    Every command starts here. The commands that retrofit (``inject``, ``bench``) call
    :func:`refuse_retrofitted` first: a retrofitted file is refused from its recipe alone,
    before anything it names is built.
    """
    from ulsam_inject.io import sources
    from ulsam_inject.io.checkpoints import load_state_dict_into, read_state_dict

    size = sources.parse_input_size(input_size) if input_size else None
    if looks_like_file(model):
        if checkpoint is not None or pretrained or kwargs_text:
            raise UlsamUsageError(
                f"{model} is a retrofitted-model file: it carries its own weights and model "
                f"arguments, so --checkpoint, --pretrained and --model-kwargs do not apply"
            )
        from ulsam_inject.io.artifact import load_retrofit

        progress(f"rebuilding {model}")
        retrofit = load_retrofit(model, trust_recipe=trust_recipe)
        return LoadedModel(
            retrofit.model,
            retrofit.source,
            dict(retrofit.source_kwargs or {}),
            size or retrofit.input_size,
            retrofit,
        )
    spec = sources.parse_model_spec(model, parse_kwargs(kwargs_text))
    progress(f"building {spec.spec}" + (" (fetching its pretrained weights)" if pretrained else ""))
    if pretrained:
        # torch.hub writes "Downloading: URL to FILE" on stdout, even with progress=False,
        # where it would break --json: what the fetch prints goes to stderr once it has
        # succeeded, and a failed fetch is told in one line.
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            module = sources.build_model(spec, pretrained=True)
        if captured.getvalue():
            sys.stderr.write(captured.getvalue())
    else:
        module = sources.build_model(spec)
    if checkpoint is not None:
        progress(f"loading {checkpoint}")
        state = read_state_dict(checkpoint, trust=trust)
        try:
            load_state_dict_into(module, state)
        except CheckpointError as error:
            raise CheckpointError(f"{checkpoint}: {error}") from None
    module.eval()
    return LoadedModel(
        module, spec.spec, dict(spec.kwargs), size or sources.default_input_size(spec)
    )


def refuse_retrofitted(model: str, what: str) -> None:
    """Refuse a MODEL file written by --out, from its recipe alone: nothing is built."""
    if not looks_like_file(model):
        return
    from ulsam_inject.io.artifact import is_artifact, read_recipe

    if is_artifact(model):
        source = read_recipe(model)["model"]
        raise UlsamUsageError(
            f"{model} is already retrofitted; {what} its source model ({source}) "
            f"with the combined positions instead"
        )


def progress(message: str) -> None:
    """A transient progress line on stderr, shown only when stderr is a terminal.

    As git does: piped or logged runs keep stderr for what matters (notes and the one line
    of an error).
    """
    if err_console.is_terminal:
        err_console.print(f"[dim]{message}[/dim]", highlight=False)


def note(message: str) -> None:
    """A status line on stderr that is always shown (what was written, what was skipped)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()
