"""The explainer on models it can be checked against: a planted object, known panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from planted_square import (
    CONFIG,
    SIZE,
    SQUARE,
    as_pil,
    square_image,
    trained_detector,
    with_ulsam,
)
from torch import nn

from ulsam_inject.errors import ImageError, LayerError, OutputError, UlsamUsageError
from ulsam_inject.heatmaps import METHODS, explain
from ulsam_inject.heatmaps.maps import map_stats

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def detector() -> nn.Sequential:
    return trained_detector()


@pytest.fixture(scope="module")
def retrofitted(detector: nn.Sequential) -> nn.Module:
    return with_ulsam(detector)


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
@pytest.mark.parametrize(("top", "left"), [(18, 4), (3, 20), (22, 22)])
def test_peak_falls_inside_the_planted_square(
    detector: nn.Module, method: str, top: int, left: int
) -> None:
    image = as_pil(square_image(np.random.default_rng(top * 100 + left), top, left))
    result = explain({"detector": detector}, [image], config=CONFIG, method=method)
    found = result.map(0, 0)
    assert found.target.index == 1 and found.target.probability > 0.9
    row, col = found.stats.peak
    assert top <= row < top + SQUARE and left <= col < left + SQUARE, found.stats
    # The map is concentrated: far more than the 10% a flat map has in its top 10%.
    assert found.stats.top10_mass is not None and found.stats.top10_mass > 0.5


def test_panels_are_images_by_one_plus_models_and_the_png_is_valid(
    detector: nn.Module, retrofitted: nn.Module, tmp_path: Path
) -> None:
    generator = np.random.default_rng(1)
    images = [as_pil(square_image(generator, 4, 4)), as_pil(square_image(generator, None, None))]
    result = explain({"plain": detector, "ulsam": retrofitted}, images, config=CONFIG)
    assert len(result.figure.axes) == 2 * (1 + 2)
    assert [(m.image, m.model) for m in result.maps] == [
        ("image 1", "plain"),
        ("image 1", "ulsam"),
        ("image 2", "plain"),
        ("image 2", "ulsam"),
    ]
    assert {m.layer for m in result.maps} == {"5"}  # the last map before pooling, in both
    path = result.save(tmp_path / "maps.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(OutputError, match="exists"):
        result.save(tmp_path / "maps.png")


def test_attention_adds_one_panel_per_block(retrofitted: nn.Module, detector: nn.Module) -> None:
    image = as_pil(square_image(np.random.default_rng(2), 10, 10))
    result = explain(
        {"plain": detector, "ulsam": retrofitted}, [image], config=CONFIG, attention=True
    )
    plain, ulsam = result.maps
    assert plain.attention == {}
    assert list(ulsam.attention) == ["2.ulsam"]
    maps = ulsam.attention["2.ulsam"]
    assert maps.shape == (4, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert len(result.figure.axes) == 1 + 2 + 1
    assert result.to_dict()["maps"][1]["attention"] == {"2.ulsam": 4}


def test_a_model_without_class_names_is_labelled_with_indices(detector: nn.Module) -> None:
    image = as_pil(square_image(np.random.default_rng(3), None, None))
    found = explain(detector, image, config=CONFIG, top_k=2).map(0, 0)
    assert [p.name for p in found.predictions] == [str(p.index) for p in found.predictions]
    assert sorted(p.index for p in found.predictions) == [0, 1]


def test_given_names_and_class_are_used(detector: nn.Module) -> None:
    image = as_pil(square_image(np.random.default_rng(4), 8, 8))
    found = explain(
        detector, image, config=CONFIG, class_names=["noise", "square"], target_class=0
    ).map(0, 0)
    assert (found.target.index, found.target.name) == (0, "noise")
    assert found.predictions[0].name == "square"


def test_the_callers_model_is_left_as_it_was() -> None:
    model = trained_detector(steps=1)
    model.train()
    model.zero_grad(set_to_none=True)
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)
    explain(model, as_pil(square_image(np.random.default_rng(5), 0, 0)), config=CONFIG)
    assert model.training
    assert first.grad is not None and torch.equal(first.grad, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_missing_layer_says_what_is_close(detector: nn.Module) -> None:
    image = as_pil(square_image(np.random.default_rng(6), None, None))
    with pytest.raises(LayerError, match=r"layer '55' is not a module .*did you mean 5"):
        explain(detector, image, config=CONFIG, layer="55")
    with pytest.raises(LayerError, match="does not output a 4-D feature map"):
        explain(detector, image, config=CONFIG, layer="8")


def test_a_named_layer_is_explained(retrofitted: nn.Module) -> None:
    image = as_pil(square_image(np.random.default_rng(7), 20, 20))
    found = explain(retrofitted, image, config=CONFIG, layer="2.ulsam").map(0, 0)
    assert found.layer == "2.ulsam" and found.cam.shape == (SIZE, SIZE)


def test_bad_inputs_are_usage_errors(detector: nn.Module, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.png' is not an image"):
        explain(detector, [text], config=CONFIG)
    with pytest.raises(ImageError, match="does not exist"):
        explain(detector, [tmp_path / "absent.jpg"], config=CONFIG)
    image = as_pil(square_image(np.random.default_rng(8), None, None))
    with pytest.raises(UlsamUsageError, match=r"method 'gradcam\+' is not one of"):
        explain(detector, image, config=CONFIG, method="gradcam+")
    with pytest.raises(UlsamUsageError, match="class 2 is out of range"):
        explain(detector, image, config=CONFIG, target_class=2)


def test_map_stats_of_a_flat_and_an_empty_map() -> None:
    assert map_stats(np.ones((10, 10))).top10_mass == pytest.approx(0.1)
    assert map_stats(np.zeros((4, 4))).top10_mass is None
    assert "gradcam++" in METHODS and "scorecam" in METHODS
