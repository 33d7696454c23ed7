"""save() takes the retrofitted nn.Module itself and refuses what its recipe cannot rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ulsam_inject import inject, load, read_recipe, save
from ulsam_inject.errors import ArtifactError

SMALL = (3, 64, 64)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_the_bare_module_saves_with_its_plan_read_from_its_blocks(tv_model, tmp_path: Path):
    result = inject(
        tv_model("mobilenet_v2"),
        at=["features.13", "features.16"],
        groups={"features.16": 8},
        mode={"features.16": "replace"},
        input_size=SMALL,
    )
    path = save(result.model, tmp_path / "m.safetensors", source="torchvision:mobilenet_v2")
    recipe = read_recipe(path)
    assert recipe["plan"] == result.plan.to_list()
    assert recipe["model"] == "torchvision:mobilenet_v2"
    x = torch.randn(2, *SMALL)
    assert torch.equal(_run(load(path), x), _run(result.model, x))


def test_a_new_head_is_refused_naming_num_classes_and_saves_with_it(tv_model, tmp_path: Path):
    model = inject(tv_model("mobilenet_v2"), at="features.13", input_size=SMALL).model
    model.classifier[1] = nn.Linear(1280, 10)
    path = tmp_path / "m.safetensors"
    with pytest.raises(ArtifactError) as refused:
        save(model, path, source="torchvision:mobilenet_v2")
    message = str(refused.value)
    assert "classifier.1.weight" in message and "[10, 1280]" in message
    assert "model_kwargs={'num_classes': 10}" in message or '{"num_classes": 10}' in message
    assert "\n" not in message
    assert not path.exists()
    save(model, path, source="torchvision:mobilenet_v2", model_kwargs={"num_classes": 10})
    again = load(path)
    x = torch.randn(2, *SMALL)
    assert torch.equal(_run(again, x), _run(model, x))
    assert again.state_dict().keys() == model.state_dict().keys()


def test_timm_reset_classifier_round_trips_with_num_classes(timm_model, tmp_path: Path):
    model = inject(timm_model("mobilenetv3_small_050"), at="blocks.4", input_size=SMALL).model
    model.reset_classifier(7)
    path = tmp_path / "m.pt"
    with pytest.raises(ArtifactError, match="num_classes"):
        save(model, path, source="timm:mobilenetv3_small_050")
    save(model, path, source="timm:mobilenetv3_small_050", model_kwargs={"num_classes": 7})
    x = torch.randn(2, *SMALL)
    assert torch.equal(_run(load(path), x), _run(model, x))


def test_a_model_without_blocks_is_refused(tv_model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(ArtifactError, match="holds no ULSAM block"):
        save(tv_model("mobilenet_v2"), path, source="torchvision:mobilenet_v2")
    assert not path.exists()


def test_a_block_made_by_hand_is_refused(tv_model, tmp_path: Path):
    from ulsam_inject import ULSAM

    model = tv_model("mobilenet_v2")
    model.features[13] = nn.Sequential(model.features[13], ULSAM(96, 4))
    with pytest.raises(ArtifactError, match="not put in by inject"):
        save(model, tmp_path / "m.safetensors", source="torchvision:mobilenet_v2")


def test_a_stage_rewritten_in_its_parent_round_trips(tv_model, tmp_path: Path):
    """MNASNet's first stage lies flat in ``layers``: its block goes into that Sequential."""
    result = inject(tv_model("mnasnet0_5"), at=[0, 3], input_size=SMALL)
    assert [p.rewrite for p in result.plan.placements] == ["parent:layers", "stage"]
    assert type(result.model).__name__ == "MNASNet"
    names = [name for name, _ in result.model.layers.named_children()]
    assert names.index("ulsam_3_7") == names.index("7") + 1  # listed where it runs
    path = save(result.model, tmp_path / "m.safetensors", source="torchvision:mnasnet0_5")
    again = load(path)
    x = torch.randn(2, *SMALL)
    assert torch.equal(_run(again, x), _run(result.model, x))
    assert list(again.state_dict()) == list(result.model.state_dict())
