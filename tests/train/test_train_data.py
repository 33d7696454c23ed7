"""Image folders, data configs from the model, skipped images, evaluate()."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ulsam_inject import EvaluateReport, evaluate
from ulsam_inject.errors import DataError
from ulsam_inject.train.data import (
    DataConfig,
    ImageFolderData,
    Skipped,
    build_transform,
    check_same_classes,
    collate,
    data_config_for,
    find_splits,
    scan_folder,
)
from ulsam_inject.train.distributed import GlooSyncBatchNorm
from ulsam_inject.train.head import replace_head


def copy_tree(image_tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(image_tree, tmp_path / "data"))


def test_missing_splits_and_empty_classes_are_named(image_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_splits(tmp_path / "nowhere")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train").mkdir()
    with pytest.raises(DataError, match="has no val/ folder"):
        find_splits(tmp_path / "only")
    data = copy_tree(image_tree, tmp_path)
    (data / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra has no images"):
        scan_folder(data / "train")
    with pytest.raises(DataError, match="give one split"):
        scan_folder(data)
    (data / "train" / "zebra").rmdir()
    shutil.rmtree(data / "val" / "red")
    with pytest.raises(DataError, match=r"val lacks \['red'\]"):
        check_same_classes(scan_folder(data / "train"), scan_folder(data / "val"))


def test_unreadable_images_are_skipped_and_counted(image_tree: Path, tmp_path: Path) -> None:
    data = copy_tree(image_tree, tmp_path)
    broken = data / "val" / "red" / "broken.png"
    broken.write_bytes(b"not a png")
    scan = scan_folder(data / "val")
    dataset = ImageFolderData(scan, build_transform(DataConfig((3, 32, 32)), train=False))
    index = [path for path, _ in scan.samples].index(str(broken))
    assert isinstance(dataset[index], Skipped)
    batch = collate([dataset[0], dataset[index], dataset[1]])
    assert batch.images is not None and batch.images.shape == (2, 3, 32, 32)
    assert [s.path for s in batch.skipped] == [str(broken)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    report = evaluate([model], dataset, batch_size=5, device="cpu")
    assert report.models[0].skipped == 1
    assert report.models[0].images == len(scan.samples) - 1


def test_data_config_comes_from_the_model() -> None:
    tv = data_config_for(None, "torchvision:mobilenet_v2", (3, 64, 64))
    assert (tv.origin, tv.interpolation, tv.input_size) == ("torchvision", "bilinear", (3, 64, 64))
    assert tv.crop_pct == pytest.approx(224 / 232)
    timm_config = data_config_for(None, "timm:mobilenetv3_small_050", (3, 64, 64))
    assert (timm_config.origin, timm_config.interpolation) == ("timm", "bicubic")
    plain = data_config_for(None, "tinynet:tiny", (3, 32, 32), mean=[0.5] * 3, std=[0.25] * 3)
    assert plain.origin == "imagenet-defaults+overrides" and plain.std == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="one value per input channel"):
        data_config_for(None, None, (3, 32, 32), mean=[0.5])
    for config in (tv, timm_config):
        for train in (True, False):
            from PIL import Image

            out = build_transform(config, train=train)(Image.new("RGB", (80, 50)))
            assert out.shape == (3, 64, 64)


def test_replace_head_and_evaluate_agreement(tinynet: ModuleType, image_tree: Path) -> None:
    torch.manual_seed(0)
    model = tinynet.tiny(num_classes=10).eval()
    assert replace_head(model, 3) == "replaced the head head (10 -> 3 classes)"
    other = tinynet.tiny(num_classes=3).eval()
    scan = scan_folder(image_tree / "val")
    dataset = ImageFolderData(scan, build_transform(DataConfig((3, 32, 32)), train=False))
    report = evaluate({"a": model, "b": other, "a again": model}, dataset, device="cpu")
    assert isinstance(report, EvaluateReport)
    document = report.to_dict()
    assert document["schema"] == "ulsam-inject.evaluate/1"
    assert document["classes"] == ["blue", "green", "red"]
    # Recomputed by hand for the first model.
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([t for _, t in scan.samples])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert report.models[0].top1 == pytest.approx(float((predicted == targets).float().mean()))
    assert report.models[0].top5 == 1.0  # 3 classes
    assert [c.model for c in report.comparisons] == ["b", "a again"]
    assert report.comparisons[1].agreement == 1.0
    assert report.comparisons[1].gained == () and report.comparisons[1].lost == ()
    with torch.no_grad():
        predicted_b = other(images).argmax(1)
    assert report.comparisons[0].agreement == pytest.approx(
        float((predicted == predicted_b).float().mean())
    )


def test_gloo_sync_batchnorm_alone_is_batchnorm() -> None:
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    synced = GlooSyncBatchNorm(4)
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(plain(x), synced(x))
