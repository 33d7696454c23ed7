"""Class names from a model's own metadata, when it has them.

torchvision: the default weights' ``meta["categories"]`` (the enum is code: nothing is
downloaded). timm: ImageNet's label descriptions shipped with timm (``timm.data.
ImageNetInfo``) for a model with a pretrained config of an ImageNet subset. Names are used
only when their count is the model's number of outputs; otherwise there are none and
callers show indices.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["class_names_for", "label"]


def class_names_for(
    source: str | None, module: nn.Module | None, num_classes: int
) -> tuple[str, ...] | None:
    """The names of the ``num_classes`` outputs of ``module`` (built from spec ``source``), or None.

    Example:
        >>> class_names_for("torchvision:mobilenet_v2", None, 1000)[:2]
        ('tench', 'goldfish')
        >>> class_names_for("torchvision:mobilenet_v2", None, 10) is None
        True
    """
    names: Sequence[str] | None = None
    if source is not None and source.startswith("torchvision:"):
        names = _torchvision_names(source.split(":", 1)[1])
    elif (source is not None and source.startswith("timm:")) or getattr(
        module, "pretrained_cfg", None
    ):
        names = _timm_names(module, num_classes)
    if names is None or len(names) != num_classes:
        return None
    return tuple(str(name) for name in names)


def label(index: int, names: Sequence[str] | None) -> str:
    """``names[index]``, or the index itself as text when there are no names."""
    return names[index] if names is not None and 0 <= index < len(names) else str(index)


def _torchvision_names(name: str) -> Sequence[str] | None:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # no weights enum for this name: no names, not an error
        return None
    categories = weights.meta.get("categories")
    return list(categories) if categories else None


def _timm_names(module: nn.Module | None, num_classes: int) -> Sequence[str] | None:
    try:
        import timm.data
    except ImportError:
        return None
    subset = None
    if module is not None and getattr(module, "pretrained_cfg", None):
        try:
            subset = timm.data.infer_imagenet_subset(module)
        except Exception:  # an unusual config: fall back to the class count
            subset = None
    if subset is None and num_classes == 1000:
        subset = "imagenet-1k"
    if subset is None:
        return None
    try:
        info = timm.data.ImageNetInfo(subset)
    except Exception:
        return None
    # "goldfish, Carassius auratus" -> "goldfish": titles stay short.
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
