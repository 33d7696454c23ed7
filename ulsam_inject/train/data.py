"""Data for fine-tuning and evaluation: image folders, preprocessing from the model, batches.

- :class:`DataConfig` is the preprocessing a model expects (input size, mean, std,
  interpolation, crop fraction), found from the model itself by :func:`data_config_for`:
  timm's pretrained config for timm models, the default weights' transforms for torchvision
  models, ImageNet defaults otherwise; each field can be overridden.
- :func:`scan_folder` reads an ImageFolder tree (``ROOT/CLASS/IMAGE``) and refuses
  missing or empty folders with a message naming what is missing.
- :class:`ImageFolderData` is a map-style dataset of such a tree. An image that cannot be
  read is *skipped and counted*: the sample comes back as a :class:`Skipped` marker, which
  :func:`collate` drops from its batch and reports, so one broken file never stops a run.
- :class:`SeededSamples` makes any map-style dataset's random augmentation a function of
  (seed, epoch, index) alone: the same images whatever the number of loader workers or
  processes, which is what makes a run repeatable and a distributed run comparable.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from ulsam_inject.errors import DataError, MissingDependencyError, UlsamUsageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "Batch",
    "DataConfig",
    "EpochKeys",
    "FolderScan",
    "ImageFolderData",
    "SeededSamples",
    "Skipped",
    "build_transform",
    "collate",
    "data_config_for",
    "find_splits",
    "sample_shape",
    "scan_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a model expects; ``origin`` says where it came from."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = DEFAULT_CROP_PCT
    origin: str = "imagenet-defaults"

    def __post_init__(self) -> None:
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise UlsamUsageError(
                f"mean {list(self.mean)} and std {list(self.std)} need one value per input "
                f"channel ({channels})"
            )
        if any(s <= 0 for s in self.std):
            raise UlsamUsageError(f"std values must be positive, got {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UlsamUsageError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if not 0 < self.crop_pct <= 1:
            raise UlsamUsageError(f"crop fraction must be in (0, 1], got {self.crop_pct}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "origin": self.origin,
        }


def data_config_for(
    model: nn.Module | None,
    source: str | None,
    input_size: tuple[int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
) -> DataConfig:
    """The preprocessing for ``model`` (built from the spec ``source``) at ``input_size``.

    timm models: timm's data config (``resolve_model_data_config``, or the pretrained config
    of the spec's architecture when the model object no longer carries it). torchvision
    models: the default weights' transforms (their metadata only; nothing is downloaded).
    Otherwise ImageNet's mean and std, bilinear, crop fraction 0.875. The input size is
    always ``input_size``; ``mean``, ``std`` and ``interpolation`` override what was found.

    Example:
        >>> data_config_for(None, "torchvision:mobilenet_v2", (3, 224, 224)).crop_pct
        0.9655172413793104
    """
    found: dict[str, Any] = {}
    origin = "imagenet-defaults"
    if source is not None and source.startswith("timm:"):
        found = _timm_config(model, source.split(":", 1)[1])
        origin = "timm"
    elif source is not None and source.startswith("torchvision:"):
        found = _torchvision_config(source.split(":", 1)[1])
        origin = "torchvision" if found else origin
    if mean is not None:
        found["mean"] = tuple(float(v) for v in mean)
    if std is not None:
        found["std"] = tuple(float(v) for v in std)
    if interpolation is not None:
        found["interpolation"] = interpolation
    if mean is not None or std is not None or interpolation is not None:
        origin += "+overrides"
    return DataConfig(input_size=tuple(input_size), origin=origin, **found)  # type: ignore[arg-type]


def _timm_config(model: nn.Module | None, name: str) -> dict[str, Any]:
    try:
        import timm.data
        import timm.models
    except ImportError:
        raise MissingDependencyError(
            "timm models need the timm package: pip install 'ulsam-inject[timm]'"
        ) from None
    if model is not None and getattr(model, "pretrained_cfg", None):
        config = timm.data.resolve_model_data_config(model)
    else:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
        config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    interpolation = str(config.get("interpolation", "bilinear"))
    return {
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic",
        "crop_pct": float(config.get("crop_pct", DEFAULT_CROP_PCT)),
    }


def _torchvision_config(name: str) -> dict[str, Any]:
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except Exception:
        return {}
    if not isinstance(preset, ImageClassification):
        return {}
    crop = preset.crop_size[0]
    resize = preset.resize_size[0]
    return {
        "mean": tuple(float(v) for v in preset.mean),
        "std": tuple(float(v) for v in preset.std),
        "interpolation": str(preset.interpolation.value),
        "crop_pct": min(1.0, crop / resize),
    }


def build_transform(config: DataConfig, *, train: bool, timm_style: bool | None = None) -> Any:
    """The image -> tensor transform for ``config``: augmented for training, else resize+crop.

    timm models (``config.origin`` starts with "timm") get timm's ``create_transform``;
    others torchvision's RandomResizedCrop + flip (training) or resize + center crop.
    """
    if timm_style is None:
        timm_style = config.origin.startswith("timm")
    _, height, width = config.input_size
    size: tuple[int, int] = (height, width)
    if timm_style:
        from timm.data import create_transform

        return create_transform(
            input_size=config.input_size,
            is_training=train,
            mean=config.mean,
            std=config.std,
            interpolation=config.interpolation,
            crop_pct=config.crop_pct,
        )
    from torchvision import transforms as T

    mode = T.InterpolationMode(config.interpolation)
    tail = [T.ToTensor(), T.Normalize(config.mean, config.std)]
    if train:
        return T.Compose(
            [T.RandomResizedCrop(size, interpolation=mode), T.RandomHorizontalFlip(), *tail]
        )
    resize = tuple(int(s / config.crop_pct) for s in size)
    return T.Compose(
        [
            T.Resize(resize[0] if height == width else resize, interpolation=mode),
            T.CenterCrop(size),
            *tail,
        ]
    )


# --- image folders ------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderScan:
    """An ImageFolder tree: its classes (sorted folder names) and (path, class index) pairs."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]


def find_splits(data: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``DATA/train`` and ``DATA/val``, or a :class:`DataError` naming what is missing."""
    root = Path(data)
    layout = "an ImageFolder tree DATA/train/CLASS/IMAGE and DATA/val/CLASS/IMAGE"
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; expected {layout}")
    if not root.is_dir():
        raise DataError(f"data {root} is not a folder; expected {layout}")
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise DataError(
            f"data folder {root} has no {' and no '.join(f'{m}/' for m in missing)} folder; "
            f"expected {layout}"
        )
    return root / "train", root / "val"


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """Classes and images of ``root`` (``root/CLASS/IMAGE``); empty classes are refused."""
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a folder")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        if {"train", "val"} <= {p.name for p in folder.iterdir()}:
            raise DataError(f"{folder} holds train/ and val/: give one split, e.g. {folder}/val")
        raise DataError(
            f"image folder {folder} has no class folders; expected {folder}/CLASS/IMAGE"
        )
    if set(classes) == {"train", "val"}:
        raise DataError(f"{folder} holds train/ and val/: give one split, e.g. {folder}/val")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        found = sorted(
            str(path)
            for path in (folder / name).rglob("*")
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        if not found:
            raise DataError(
                f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"add images or remove the folder"
            )
        samples.extend((path, index) for path in found)
    return FolderScan(folder, tuple(classes), tuple(samples))


def check_same_classes(train: FolderScan, val: FolderScan) -> None:
    """Training and validation folders must name the same classes (same indices)."""
    if train.classes == val.classes:
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    parts = []
    if only_train:
        parts.append(f"{val.root} lacks {only_train}")
    if only_val:
        parts.append(f"{train.root} lacks {only_val}")
    raise DataError(f"train and val classes differ: {'; '.join(parts)}")


class Skipped(NamedTuple):
    """A sample whose image could not be read: where, and why."""

    path: str
    reason: str


class ImageFolderData(Dataset[Any]):
    """Images of a :class:`FolderScan`, transformed; unreadable ones come back :class:`Skipped`."""

    def __init__(self, scan: FolderScan, transform: Callable[[Any], Any], channels: int = 3):
        self.scan = scan
        self.classes = list(scan.classes)
        self.targets = [target for _, target in scan.samples]
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.scan.samples)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        path, target = self.scan.samples[index]
        try:
            with Image.open(path) as image:
                picture = image.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as error:
            return Skipped(path, f"{type(error).__name__}: {error}")
        return self.transform(picture), target


# --- repeatable sampling ---------------------------------------------------------------------


class EpochKeys(Sampler[tuple[int, int]]):
    """``(epoch, index)`` for each index of ``sampler``: the keys of :class:`SeededSamples`."""

    def __init__(self, sampler: Sampler[int], epoch: int) -> None:
        self.sampler = sampler
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield self.epoch, int(index)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class SeededSamples(Dataset[Any]):
    """``dataset[index]`` with torch's, Python's and numpy's RNGs seeded by (seed, epoch, index).

    Keys are ``(epoch, index)`` pairs (see :class:`EpochKeys`). The global RNG states are
    restored afterwards, so the caller's random streams are not disturbed.
    """

    def __init__(self, dataset: Dataset[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        digest = hashlib.blake2b(f"{self.seed}:{epoch}:{index}".encode(), digest_size=8).digest()
        sample_seed = int.from_bytes(digest, "little") & (2**63 - 1)
        python_state = random.getstate()
        numpy_state = _numpy_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            if numpy_state is not None:
                import numpy

                numpy.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                if numpy_state is not None:
                    import numpy

                    numpy.random.set_state(numpy_state)


def _numpy_state() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random.get_state()


def sample_shape(data: Dataset[Any], tries: int = 64) -> tuple[int, ...]:
    """The shape of the first readable image of ``data`` (among its first ``tries``)."""
    for index in range(min(len(data), tries)):  # type: ignore[arg-type]
        item = data[index]
        if not isinstance(item, Skipped):
            return tuple(torch.as_tensor(item[0]).shape)
    raise DataError(f"no readable image among the first {tries} of the data")


class Batch(NamedTuple):
    """A batch: images and targets (None when every sample was skipped), and the skipped ones."""

    images: torch.Tensor | None
    targets: torch.Tensor | None
    skipped: list[Skipped]


def collate(samples: list[Any]) -> Batch:
    """Stack (image, target) samples; :class:`Skipped` markers are dropped and reported."""
    skipped = [s for s in samples if isinstance(s, Skipped)]
    kept = [s for s in samples if not isinstance(s, Skipped)]
    if not kept:
        return Batch(None, None, skipped)
    images = torch.stack([torch.as_tensor(image) for image, _ in kept])
    targets = torch.as_tensor([int(target) for _, target in kept], dtype=torch.long)
    return Batch(images, targets, skipped)
