"""Heat maps with the ``grad-cam`` package, ULSAM's own attention maps, and their statistics.

The CAM methods are the package's (``pip install 'ulsam-inject[explain]'``); this module
only runs them without side effects on the caller's model: grad-cam switches the model to
eval mode, zeroes its gradients and leaves hooks registered when used as it documents, so
the training flag, every parameter's ``.grad`` and the hooks are put back as they were.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ulsam_inject.block.module import ULSAM
from ulsam_inject.errors import MissingDependencyError, UlsamUsageError
from ulsam_inject.guards import echo

__all__ = ["METHODS", "MapStats", "attention_inputs", "check_method", "compute_cam", "map_stats"]

METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "gradcam-elementwise": "GradCAMElementWise",
    "scorecam": "ScoreCAM",
}
"""``--method`` names and the ``pytorch_grad_cam`` classes they run (one target layer each)."""

DEFAULT_METHOD = "gradcam++"


@dataclass(frozen=True)
class MapStats:
    """Where a heat map peaks and how concentrated it is.

    ``peak`` is the (row, col) of the maximum in model-input pixels; ``top10_mass`` the
    share of the map's total in its top 10% of pixels (0.1 for a flat map, 1.0 when all of
    it is there), None for an all-zero map.
    """

    peak: tuple[int, int]
    top10_mass: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"peak": list(self.peak), "top10_mass": self.top10_mass}


def map_stats(cam: np.ndarray) -> MapStats:
    """:class:`MapStats` of a 2-D map.

    Example:
        >>> cam = np.zeros((10, 10)); cam[2, 7] = 1.0
        >>> map_stats(cam)
        MapStats(peak=(2, 7), top10_mass=1.0)
    """
    values = np.asarray(cam, dtype=np.float64)
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    flat = np.sort(np.clip(values.ravel(), 0, None))[::-1]
    total = float(flat.sum())
    top = max(1, round(0.1 * flat.size))
    mass = float(flat[:top].sum()) / total if total > 0 else None
    return MapStats((int(row), int(col)), mass)


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else an :class:`UlsamUsageError`."""
    if method not in METHODS:
        raise UlsamUsageError(f"method {echo(method)} is not one of {', '.join(METHODS)}")
    return method


def _cam_class(method: str) -> Any:
    try:
        import pytorch_grad_cam
    except ImportError:
        raise MissingDependencyError(
            "heat maps need the grad-cam package: pip install 'ulsam-inject[explain]'"
        ) from None
    return getattr(pytorch_grad_cam, METHODS[check_method(method)])


@contextlib.contextmanager
def attention_inputs(model: nn.Module) -> Any:
    """Within the block, the input of each ULSAM block's first call, by module name."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, ULSAM):

            def keep(module: nn.Module, args: Any, name: str = name) -> None:
                captured.setdefault(name, args[0].detach())

            handles.append(module.register_forward_pre_hook(keep))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_pictures(
    model: nn.Module, inputs: dict[str, torch.Tensor], size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Each block's ``(g, H, W)`` attention maps for its captured input, upsampled to ``size``.

    Each map is scaled to [0, 1] on its own (a softmax over H*W is tiny everywhere; its
    shape is what shows).
    """
    modules = dict(model.named_modules())
    result: dict[str, np.ndarray] = {}
    for name, x in inputs.items():
        block = modules[name]
        assert isinstance(block, ULSAM)
        with torch.no_grad():
            maps = block.attention_maps(x[:1]).float()
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0]
        low = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
        high = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
        result[name] = ((maps - low) / (high - low).clamp_min(1e-12)).cpu().numpy()
    return result


def compute_cam(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, target_class: int, method: str
) -> np.ndarray:
    """The ``method`` heat map of ``target_class`` at ``layer`` for input ``x`` (batch 1).

    An ``(H, W)`` array in [0, 1] at the input's size (grad-cam scales each map to [0, 1]).
    The model's training flag, parameter gradients and requires-grad flags are restored.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = _cam_class(method)
    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}
    # The input needs a gradient when the layers before ``layer`` are frozen: otherwise
    # the feature map has none, and gradient methods would have nothing to weigh it by.
    x = x.detach().clone().requires_grad_(True)
    cam = cam_class(model=model, target_layers=[layer])
    try:
        # Not ``with cam``: its __exit__ swallows IndexError after printing it on stdout.
        # ScoreCAM draws a tqdm bar: what the package prints is kept out of our output.
        noise = io.StringIO()
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(target_class)])
    finally:
        cam.activations_and_grads.release()
        model.train(was_training)
        for parameter, grad in grads.items():
            parameter.grad = grad
    result: np.ndarray = np.asarray(maps[0], dtype=np.float32)
    return result
