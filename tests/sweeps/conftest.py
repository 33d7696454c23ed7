"""Fixtures for the sweep tests: the tiny model importable, a small image folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cli_helpers import tiny_importable, write_tiny_module
from train.images import write_tree


@pytest.fixture(scope="session")
def sweep_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/train (16 images per class) and DATA/val (4 per class), 3 classes, 40 px PNGs."""
    return write_tree(tmp_path_factory.mktemp("images"), train_per_class=16, val_per_class=4)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tinynet")
    write_tiny_module(folder)
    return folder


@pytest.fixture
def tinynet(tiny_folder: Path) -> Iterator[ModuleType]:
    """``tinynet`` imported (spec ``tinynet:tiny``); features.0 (8 channels) and features.2
    (16) keep their shape, features.1 (8 -> 16, stride 2) does not."""
    with tiny_importable(tiny_folder) as module:
        yield module
