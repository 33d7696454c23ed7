"""``explain``: heat maps of several models on several images, as data and one figure.

For every (image, model): the model's top-k predictions, the heat map of the explained
class (the top-1 unless a class is given) at one layer, its statistics, and with
``attention`` each ULSAM block's own attention maps. :class:`Subject` is a model as the
explainer sees it (name, module, preprocessing, class names); :func:`explain` makes them
from plain modules, the CLI from model specs and files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.guards import check_model
from ulsam_inject.heatmaps import images as image_io
from ulsam_inject.heatmaps.labels import class_names_for, label
from ulsam_inject.heatmaps.layers import default_layer, record_maps, resolve_layer
from ulsam_inject.heatmaps.maps import (
    DEFAULT_METHOD,
    MapStats,
    attention_inputs,
    attention_pictures,
    check_method,
    compute_cam,
    map_stats,
)
from ulsam_inject.train.data import DataConfig, data_config_for

__all__ = ["Explanation", "ModelMap", "Prediction", "Subject", "explain", "explain_subjects"]

SCHEMA = "ulsam-inject.explain/1"
ImageLike = str | os.PathLike[str] | Any  # a path, or a PIL image


@dataclass(frozen=True)
class Subject:
    """A model to explain: its name in titles, the module, its preprocessing, class names."""

    name: str
    module: nn.Module
    config: DataConfig
    class_names: tuple[str, ...] | None = None
    source: str | None = None


@dataclass(frozen=True)
class Prediction:
    index: int
    name: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "probability": self.probability}


@dataclass(frozen=True)
class ModelMap:
    """One model on one image: predictions, the heat map and its statistics.

    ``cam`` is ``(H, W)`` in [0, 1] at the model's input size and ``picture`` the
    ``(H, W, 3)`` input it explains; ``attention`` maps each ULSAM block's name to its
    ``(g, H, W)`` attention maps, upsampled and each scaled to [0, 1] (empty unless asked).
    """

    model: str
    image: str
    layer: str
    method: str
    target: Prediction
    predictions: tuple[Prediction, ...]
    stats: MapStats
    cam: np.ndarray = field(repr=False)
    picture: np.ndarray = field(repr=False)
    attention: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "image": self.image,
            "layer": self.layer,
            "method": self.method,
            "input_size": list(self.cam.shape),
            "target": self.target.to_dict(),
            "predictions": [p.to_dict() for p in self.predictions],
            **self.stats.to_dict(),
            "attention": {name: int(maps.shape[0]) for name, maps in self.attention.items()},
        }


@dataclass
class Explanation:
    """What :func:`explain` returns: the maps (image-major) and the figure drawing them."""

    images: list[str]
    models: list[str]
    maps: list[ModelMap]
    figure: Any = field(repr=False)  # a matplotlib Figure

    def map(self, image: int, model: int) -> ModelMap:
        """The map of the ``image``-th image and the ``model``-th model."""
        return self.maps[image * len(self.models) + model]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``ulsam-inject explain --json`` (without the CLI's keys)."""
        return {
            "schema": SCHEMA,
            "images": self.images,
            "models": self.models,
            "maps": [m.to_dict() for m in self.maps],
        }

    def save(self, path: str | os.PathLike[str], *, force: bool = False, dpi: int = 110) -> Path:
        """Write the figure (.png or .svg) atomically; an existing file only with ``force``."""
        from ulsam_inject.heatmaps.figure import save_figure

        return save_figure(self.figure, path, force=force, dpi=dpi)


def explain(
    models: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
    images: ImageLike | Sequence[ImageLike],
    *,
    layer: str | None = None,
    target_class: int | None = None,
    method: str = DEFAULT_METHOD,
    attention: bool = False,
    top_k: int = 5,
    input_size: tuple[int, int, int] = (3, 224, 224),
    class_names: Sequence[str] | None = None,
    config: DataConfig | None = None,
) -> Explanation:
    """Heat maps (Grad-CAM++ by default) of ``models`` on ``images``, and the figure.

    ``models``: one module, a list, or ``{name: module}``. ``images``: paths or PIL images.
    Preprocessing: ``config``, else ImageNet's mean and std at ``input_size`` (timm models
    with a pretrained config get timm's). ``layer`` defaults to the deepest feature map
    before pooling; ``target_class`` to each model's top-1. Class names: ``class_names``,
    else the model's own metadata (timm), else indices. Needs ``ulsam-inject[explain]``.

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ...                           torch.nn.Linear(4, 2)).eval()
        >>> result = explain({"net": net}, [Image.new("RGB", (40, 40))], input_size=(3, 32, 32))
        >>> result.map(0, 0).layer, result.map(0, 0).cam.shape, len(result.figure.axes)
        ('1', (32, 32), 2)
    """
    if isinstance(models, nn.Module):
        named: dict[str, nn.Module] = {type(models).__name__: models}
    elif isinstance(models, Mapping):
        named = dict(models)
    else:
        named = {}
        for module in models:
            name = type(module).__name__
            named[name if name not in named else f"{name} #{len(named) + 1}"] = module
    subjects = []
    for name, module in named.items():
        check_model(module, function="explain")
        settings = config or data_config_for(module, None, input_size)
        subjects.append(Subject(name, module, settings, tuple(class_names or ()) or None))
    return explain_subjects(
        subjects,
        images,
        layer=layer,
        target_class=target_class,
        method=method,
        attention=attention,
        top_k=top_k,
    )


def explain_subjects(
    subjects: Sequence[Subject],
    images: ImageLike | Sequence[ImageLike],
    *,
    layer: str | None = None,
    target_class: int | None = None,
    method: str = DEFAULT_METHOD,
    attention: bool = False,
    top_k: int = 5,
) -> Explanation:
    """:func:`explain` for prepared :class:`Subject` s (what the CLI calls)."""
    check_method(method)
    if not subjects:
        raise UlsamUsageError("explain needs at least one model")
    if top_k < 1:
        raise UlsamUsageError(f"top-k must be at least 1, got {top_k}")
    single = isinstance(images, (str, os.PathLike)) or hasattr(images, "mode")  # a PIL image
    listed: list[Any] = [images] if single else list(images)  # type: ignore[arg-type]
    if not listed:
        raise UlsamUsageError("explain needs at least one image")
    names: list[str] = []
    loaded: list[Any] = []
    for index, item in enumerate(listed):
        if isinstance(item, (str, os.PathLike)):
            names.append(Path(os.fspath(item)).name)
            loaded.append(item)  # read per model: the channel count may differ
            image_io.read_image(item)  # every file is checked before any model runs
        else:
            names.append(f"image {index + 1}")
            loaded.append(item)
    maps = [
        _explain_one(subject, item, name, layer, target_class, method, attention, top_k)
        for item, name in zip(loaded, names)
        for subject in subjects
    ]
    from ulsam_inject.heatmaps.figure import draw

    result = Explanation(names, [s.name for s in subjects], maps, None)
    result.figure = draw(result)
    return result


def _explain_one(
    subject: Subject,
    item: Any,
    image_name: str,
    layer: str | None,
    target_class: int | None,
    method: str,
    attention: bool,
    top_k: int,
) -> ModelMap:
    channels = subject.config.input_size[0]
    if isinstance(item, (str, os.PathLike)):
        image = image_io.read_image(item, channels=channels)
    else:
        image = item.convert("L" if channels == 1 else "RGB")
    x = image_io.model_input(image, subject.config)
    model = subject.module
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = x.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_maps(model) as shapes, attention_inputs(model) as blocks:
            logits = model(x)
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise UlsamUsageError(
            f"{subject.name} must return (batch, classes) logits to be explained, got "
            f"{type(logits).__name__} of shape {tuple(getattr(logits, 'shape', ()))}"
        )
    num_classes = logits.shape[1]
    names = subject.class_names
    if names is None or len(names) != num_classes:
        names = class_names_for(subject.source, model, num_classes)
    probabilities = torch.softmax(logits[0].float(), dim=0)
    top = probabilities.topk(min(top_k, num_classes))
    predictions = tuple(
        Prediction(int(i), label(int(i), names), float(p)) for p, i in zip(top.values, top.indices)
    )
    target_index = predictions[0].index if target_class is None else target_class
    if not 0 <= target_index < num_classes:
        raise UlsamUsageError(
            f"class {target_index} is out of range for {subject.name} ({num_classes} classes)"
        )
    layer_name = layer if layer is not None else default_layer(shapes, subject.name)
    module = resolve_layer(model, layer_name, shapes, subject.name)
    cam = compute_cam(model, module, x, target_index, method)
    size = (int(x.shape[2]), int(x.shape[3]))
    return ModelMap(
        model=subject.name,
        image=image_name,
        layer=layer_name,
        method=method,
        target=Prediction(
            target_index, label(target_index, names), float(probabilities[target_index])
        ),
        predictions=predictions,
        stats=map_stats(cam),
        cam=cam,
        picture=image_io.picture(x, subject.config),
        attention=attention_pictures(model, blocks, size) if attention else {},
    )
