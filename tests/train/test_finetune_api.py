"""finetune(): it learns, the warm-up touches only the new blocks, seeds repeat, resume is exact."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from ulsam_inject import FinetuneResult, finetune, inject
from ulsam_inject.errors import DataError, ResumeError
from ulsam_inject.train.data import (
    DataConfig,
    ImageFolderData,
    build_transform,
    find_splits,
    scan_folder,
)

SIZE = (3, 32, 32)
FAST: dict[str, Any] = {
    "batch_size": 8,
    "lr": 0.02,
    "finetune_lr": 0.02,
    "device": "cpu",
    "label_smoothing": 0.0,
}


def retrofitted(tinynet: ModuleType, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return inject(
        tinynet.tiny(num_classes=3), at=["features.0", "features.2"], input_size=SIZE
    ).model


def datasets(root: Path) -> tuple[ImageFolderData, ImageFolderData]:
    config = DataConfig(SIZE)
    train, val = find_splits(root)
    return (
        ImageFolderData(scan_folder(train), build_transform(config, train=True)),
        ImageFolderData(scan_folder(val), build_transform(config, train=False)),
    )


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.usefixtures("one_thread")
def test_it_learns_seeds_repeat_and_resume_is_exact(
    tinynet: ModuleType, image_tree: Path, tmp_path: Path
) -> None:
    train, val = datasets(image_tree)
    model = retrofitted(tinynet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = tmp_path / "run.resume.pt"
    first = finetune(model, train, val, epochs=4, warmup_epochs=1, checkpoint=state, **FAST)
    assert isinstance(first, FinetuneResult)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert [r.phase for r in first.history] == ["warmup", "all", "all", "all"]
    # 3 classes: chance is 1/3.
    assert first.best.val_top1 >= 0.75, first.history
    assert first.best.val_top1 == max(r.val_top1 for r in first.history)
    assert first.best_epoch == first.history.index(first.best) + 1

    second = finetune(model, train, val, epochs=4, warmup_epochs=1, **FAST)
    assert same_weights(first.model, second.model)
    assert [r.val_loss for r in first.history] == [r.val_loss for r in second.history]

    # A resume of another run (another rate) is refused before any training.
    with pytest.raises(ResumeError, match="another run"):
        finetune(model, train, val, epochs=4, warmup_epochs=1, resume=state, **{**FAST, "lr": 0.5})

    # Interrupted after epoch 2 (the checkpoint is written before on_epoch), then resumed.
    class Stop(KeyboardInterrupt):
        pass

    def stop_after_two(record: Any) -> None:
        if record.epoch == 2:
            raise Stop

    partial = tmp_path / "partial.resume.pt"
    with pytest.raises(Stop):
        finetune(
            model, train, val, epochs=4, warmup_epochs=1, checkpoint=partial,
            on_epoch=stop_after_two, **FAST,
        )  # fmt: skip
    resumed = finetune(
        model, train, val, epochs=4, warmup_epochs=1, checkpoint=partial, resume=partial, **FAST
    )
    assert resumed.resumed_at_epoch == 2
    assert same_weights(first.model, resumed.model)
    assert [r.val_top1 for r in resumed.history] == [r.val_top1 for r in first.history]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("warmup_head", [False, True])
def test_warmup_changes_only_the_new_blocks(
    tinynet: ModuleType, image_tree: Path, warmup_head: bool
) -> None:
    train, val = datasets(image_tree)
    model = retrofitted(tinynet)
    result = finetune(model, train, val, epochs=1, warmup_epochs=1, warmup_head=warmup_head, **FAST)
    before, after = model.state_dict(), result.model.state_dict()
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    # Parameters and BatchNorm statistics of the original model: bitwise equal.
    new_block = (".ulsam.", "ulsam.")
    assert all(
        any(b in f".{name}" for b in new_block) or (warmup_head and name.startswith("head."))
        for name in changed
    ), sorted(changed)
    expected = ["features.0.ulsam.dw.weight", "features.2.ulsam.pw.weight"]
    expected += ["features.0.ulsam.dw_bn.running_mean", "features.2.ulsam.pw_bn.weight"]
    expected += ["head.weight", "head.bias"] if warmup_head else []
    assert set(expected) <= changed, sorted(changed)


@pytest.mark.usefixtures("one_thread")
def test_a_class_count_mismatch_is_refused(tinynet: ModuleType, image_tree: Path) -> None:
    train, val = datasets(image_tree)
    model = inject(tinynet.tiny(num_classes=10), at="features.0", input_size=SIZE).model
    with pytest.raises(DataError, match=r"3 classes and the model's head 10.*--num-classes 3"):
        finetune(model, train, val, epochs=1, **FAST)


def test_bad_settings_are_refused(tinynet: ModuleType, image_tree: Path) -> None:
    train, val = datasets(image_tree)
    model = retrofitted(tinynet)
    with pytest.raises(ValueError, match="warmup epochs"):
        finetune(model, train, val, epochs=1, warmup_epochs=2)
    with pytest.raises(ValueError, match="optimizer 'adam'"):
        finetune(model, train, val, optimizer="adam")
    with pytest.raises(ValueError, match="unexpected keyword"):
        finetune(model, train, val, epoch=3)
