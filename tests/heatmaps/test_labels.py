"""Class names from model metadata, offline; none when the count does not match."""

from __future__ import annotations

import pytest

from ulsam_inject.heatmaps.labels import class_names_for, label


def test_torchvision_names_come_from_the_weights_enum() -> None:
    names = class_names_for("torchvision:mobilenet_v2", None, 1000)
    assert names is not None and names[:2] == ("tench", "goldfish")


def test_names_are_dropped_when_the_class_count_differs() -> None:
    assert class_names_for("torchvision:mobilenet_v2", None, 10) is None
    assert class_names_for("tinynet:tiny", None, 1000) is None
    assert class_names_for(None, None, 1000) is None


def test_timm_imagenet_names_ship_with_timm() -> None:
    pytest.importorskip("timm")
    names = class_names_for("timm:mobilenetv3_small_100", None, 1000)
    assert names is not None and names[1] == "goldfish"


def test_label_falls_back_to_the_index() -> None:
    assert label(3, None) == "3"
    assert label(1, ("a", "b")) == "b"
