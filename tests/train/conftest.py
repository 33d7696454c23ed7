"""Fixtures for fine-tuning tests: a small learnable image folder and the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from cli_helpers import tiny_importable, write_tiny_module
from train.images import write_tree


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATA/train (24 images per class) and DATA/val (8 per class), 3 classes, 40 px PNGs."""
    return write_tree(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding tinynet.py (spec ``tinynet:tiny``), for PYTHONPATH."""
    folder = tmp_path_factory.mktemp("tinynet")
    write_tiny_module(folder)
    return folder


@pytest.fixture
def tinynet(tiny_folder: Path) -> Iterator[ModuleType]:
    with tiny_importable(tiny_folder) as module:
        yield module
