"""ONNX export of a retrofitted (or any image) model, with a dynamic batch dimension.

The model is captured with ``torch.export`` (batch dimension free, as
:func:`ulsam_inject.io.artifact.capture_program` does) and translated by torch's own ONNX
exporter (``torch.onnx.export(..., dynamo=True)``). Under tracing, a ULSAM block runs its
plain ops (``forward_plain``), so it becomes standard ONNX operators of the default
domain (Conv, Relu, MaxPool, Softmax, Reshape, Unsqueeze, Mul, Add; eval-mode batch norms
are folded into the convolutions): nothing a runtime needs from this library.

Needs the ``onnx`` extra (``pip install 'ulsam-inject[onnx]'``: onnx, onnxscript, and
onnxruntime to run the file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from ulsam_inject.errors import ArtifactError, InputSizeError, MissingDependencyError, describe
from ulsam_inject.graph.modes import eval_mode
from ulsam_inject.io.artifact import batch_dynamic_shapes, example_input
from ulsam_inject.io.fileio import atomic_write
from ulsam_inject.surgery.inject import Retrofit

ONNX_OPSET = 20
"""The ONNX opset (default domain) of every file :func:`export_onnx` writes."""
ONNX_SUFFIX = ".onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_NEEDED = ("onnx", "onnxscript")


def require_onnx() -> None:
    """Raise :class:`MissingDependencyError` (one line) unless the ONNX exporter can run."""
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'ulsam-inject[onnx]'"
        )


def capture_onnx(
    model: Retrofit | nn.Module, *, input_size: tuple[int, int, int] | None = None
) -> torch.onnx.ONNXProgram:
    """Translate ``model`` (eval mode, dynamic batch) to ONNX in memory; writes nothing.

    ``model`` is a :class:`Retrofit` (its ``.model`` at its input size) or any module, for
    which ``input_size=(C, H, W)`` is required. The module's train/eval flags are restored.
    """
    require_onnx()
    module, size = _module_and_size(model, input_size)
    example = example_input(module, size)
    try:
        with eval_mode(module):
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                dynamic_shapes=batch_dynamic_shapes(),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=ONNX_OPSET,
                verbose=False,
                external_data=False,
            )
    except Exception as error:
        raise ArtifactError(
            f"torch.onnx could not export the model: {describe(error, limit=200, sentence=False)}"
        ) from error
    if program is None:  # only the TorchScript exporter returns None
        raise ArtifactError("torch.onnx returned no ONNX program")
    return program


def write_onnx(
    program: torch.onnx.ONNXProgram,
    path: str | Path,
    *,
    force: bool = False,
    protect: str | Path | None = None,
) -> Path:
    """Write a captured ONNX program to ``path`` atomically, weights inside the one file."""

    def write(tmp: Path) -> None:
        program.save(tmp, external_data=False)

    return atomic_write(Path(path), write, force=force, protect=protect)


def export_onnx(
    model: Retrofit | nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int] | None = None,
    force: bool = False,
    protect: str | Path | None = None,
) -> Path:
    """Write ``model`` as an ONNX file (opset :data:`ONNX_OPSET`, dynamic batch) atomically.

    ``model`` is a :class:`Retrofit` or any module (then ``input_size=(C, H, W)`` is
    required). The graph's input is ``input`` (``batch x C x H x W``, any batch from 1
    up) and its output ``output``. An existing file is only replaced with ``force=True``;
    ``protect`` is never overwritten. Needs ``pip install 'ulsam-inject[onnx]'``
    (:class:`MissingDependencyError` otherwise). Run it with onnxruntime::

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"input": images.numpy()})
    """
    return write_onnx(
        capture_onnx(model, input_size=input_size), path, force=force, protect=protect
    )


def _module_and_size(
    model: Retrofit | nn.Module, input_size: tuple[int, int, int] | None
) -> tuple[nn.Module, tuple[int, int, int]]:
    if isinstance(model, Retrofit):
        size = tuple(input_size) if input_size is not None else model.input_size
        return model.model, (int(size[0]), int(size[1]), int(size[2]))
    if not isinstance(model, nn.Module):
        raise ArtifactError(
            f"export_onnx takes a Retrofit or an nn.Module, got a {type(model).__name__}"
        )
    if input_size is None or len(tuple(input_size)) != 3:
        raise InputSizeError(
            f"exporting a module that is not a Retrofit needs input_size=(C, H, W), "
            f"got {input_size!r}"
        )
    channels, height, width = (int(v) for v in input_size)
    return model, (channels, height, width)
