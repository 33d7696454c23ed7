"""Reading checkpoints safely and loading them strictly (checkpoints.py). Real files only."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from ulsam_inject.errors import CheckpointError
from ulsam_inject.io.checkpoints import (
    EMA_KEYS,
    MODEL_KEYS,
    load_state_dict_into,
    read_state_dict,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


@pytest.fixture
def net() -> nn.Module:
    return small_net()


@pytest.fixture
def weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def message_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- formats ----------------------------------------------------------------------------


def test_reads_torch_zip_and_legacy_files(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    torch.save(weights, tmp_path / "new.pt")
    torch.save(weights, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_same(read_state_dict(tmp_path / "new.pt"), weights)
    assert_same(read_state_dict(str(tmp_path / "old.pth")), weights)


@pytest.mark.parametrize("name", ["w.safetensors", "w.bin", "w"])
def test_safetensors_found_by_header_not_suffix(
    tmp_path: Path, weights: dict[str, torch.Tensor], name: str
) -> None:
    save_file(weights, str(tmp_path / name))
    assert_same(read_state_dict(tmp_path / name), weights)


def test_torch_file_named_safetensors_still_reads(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    torch.save(weights, tmp_path / "mislabelled.safetensors")
    assert_same(read_state_dict(tmp_path / "mislabelled.safetensors"), weights)


def test_mobilenet_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "m.st"))
    target = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    load_state_dict_into(target, read_state_dict(tmp_path / "m.st"))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(source(x), target(x))


# --- wrappers and prefixes --------------------------------------------------------------


@pytest.mark.parametrize("key", MODEL_KEYS + EMA_KEYS)
def test_unwraps_training_wrappers(
    tmp_path: Path, weights: dict[str, torch.Tensor], key: str
) -> None:
    torch.save({key: weights, "epoch": 12, "best_acc1": 71.5}, tmp_path / "c.pt")
    assert_same(read_state_dict(tmp_path / "c.pt"), weights)


def test_training_checkpoint_with_optimizer_and_args(
    tmp_path: Path, net: nn.Module, weights: dict[str, torch.Tensor]
) -> None:
    # The layout of torchvision's reference training scripts.
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 3,
        "args": argparse.Namespace(lr=0.1, model="small"),
    }
    torch.save(checkpoint, tmp_path / "train.pth")
    assert_same(read_state_dict(tmp_path / "train.pth"), dict(net.state_dict()))


def test_plain_weights_win_over_ema(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save({"state_dict_ema": ema, "state_dict": weights}, tmp_path / "both.pt")
    assert_same(read_state_dict(tmp_path / "both.pt"), weights)
    torch.save({"model_ema": ema, "optimizer": {"state": {}}}, tmp_path / "ema.pt")
    assert_same(read_state_dict(tmp_path / "ema.pt"), ema)


def test_averaged_model_ema_loads_into_the_plain_model(tmp_path: Path, net: nn.Module) -> None:
    # torch.optim.swa_utils.AveragedModel: "module."-prefixed weights plus "n_averaged".
    ema = torch.optim.swa_utils.AveragedModel(net)
    torch.save({"model_ema": ema.state_dict(), "epoch": 1}, tmp_path / "ema.pth")
    fresh = small_net()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    load_state_dict_into(fresh, read_state_dict(tmp_path / "ema.pth"))
    assert_same(dict(fresh.state_dict()), dict(net.state_dict()))


@pytest.mark.parametrize(
    "prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]
)
def test_strips_parallel_and_compile_prefixes(
    tmp_path: Path, weights: dict[str, torch.Tensor], prefix: str
) -> None:
    torch.save({"state_dict": {prefix + k: v for k, v in weights.items()}}, tmp_path / "p.pt")
    assert_same(read_state_dict(tmp_path / "p.pt"), weights)


def test_keeps_a_prefix_not_shared_by_every_key(tmp_path: Path) -> None:
    state = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(state, tmp_path / "mixed.pt")
    assert list(read_state_dict(tmp_path / "mixed.pt")) == ["module.a", "b"]


# --- broken files -----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = message_of(tmp_path / "nope.pt")
    assert str(tmp_path / "nope.pt") in message and "does not exist" in message


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in message_of(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in message_of(tmp_path / "empty.pt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_torch_file(
    tmp_path: Path, weights: dict[str, torch.Tensor], legacy: bool, keep: float
) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(weights, whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    message = message_of(cut)
    assert str(cut) in message and "truncated, corrupt or another format" in message


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(
    tmp_path: Path, weights: dict[str, torch.Tensor], keep: float
) -> None:
    whole = tmp_path / "whole.safetensors"
    save_file(weights, str(whole))
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    assert "truncated or corrupt safetensors file" in message_of(cut)


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("noise.pt", os.urandom(4096), "truncated, corrupt or another format"),
        ("notes.pt", b"just some text\n", "truncated, corrupt or another format"),
        ("noise.safetensors", b"\x07" * 64, "no valid safetensors header"),
        ("tiny.safetensors", b"{}", "no valid safetensors header"),
    ],
)
def test_garbage(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    (tmp_path / name).write_bytes(content)
    assert fragment in message_of(tmp_path / name)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (
            {"epoch": 3, "optimizer": {"state": {}}},
            "holds no weights: a dict without tensors (keys: epoch, optimizer)",
        ),
        ({}, "an empty dict"),
        ([torch.zeros(1)], "a list, not a dict of tensors"),
        ({"state_dict": {}}, "holds no weights"),
    ],
)
def test_no_tensors(tmp_path: Path, payload: Any, fragment: str) -> None:
    torch.save(payload, tmp_path / "x.pt")
    assert fragment in message_of(tmp_path / "x.pt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "locked.pt"
    torch.save(weights, path)
    path.chmod(0)
    assert "cannot read" in message_of(path)


# --- pickled code -----------------------------------------------------------------------


def test_pickled_module_refused_then_loaded_with_trust(tmp_path: Path, net: nn.Module) -> None:
    torch.save(net, tmp_path / "whole.pt")
    message = message_of(tmp_path / "whole.pt")
    assert "holds pickled code (torch.nn.modules.container.Sequential)" in message
    assert "--trust-checkpoint" in message and "trust=True" in message
    assert_same(read_state_dict(tmp_path / "whole.pt", trust=True), dict(net.state_dict()))


def test_pickled_module_inside_a_wrapper_with_trust(tmp_path: Path, net: nn.Module) -> None:
    torch.save(
        {"model": net, "epoch": 2}, tmp_path / "wrapped.pt", _use_new_zipfile_serialization=False
    )
    assert "pickled code" in message_of(tmp_path / "wrapped.pt")
    assert_same(read_state_dict(tmp_path / "wrapped.pt", trust=True), dict(net.state_dict()))


class _Payload:
    """Unpickling this calls os.mkdir(marker): the kind of code a checkpoint may smuggle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def test_untrusted_pickled_code_never_runs(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": weights, "hook": _Payload(marker)}, tmp_path / "evil.pt")
    assert "pickled code" in message_of(tmp_path / "evil.pt")
    assert not marker.exists()


def test_trusted_file_whose_code_is_not_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"gone_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
            from torch import nn
            class Net(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(2, 2)
        """)
    )
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        module = __import__(name)
        torch.save(module.Net(), tmp_path / "net.pt")
    del sys.modules[name]
    (tmp_path / f"{name}.py").unlink()
    message = message_of(tmp_path / "net.pt", trust=True)
    assert "needs code that cannot be imported" in message and name in message


# --- load_state_dict_into ---------------------------------------------------------------


def test_load_fits_and_does_not_touch_the_given_dict(net: nn.Module) -> None:
    other = small_net()
    for p in other.parameters():
        nn.init.constant_(p, 0.5)
    given = dict(other.state_dict())
    snapshot = {k: (v, v.clone()) for k, v in given.items()}
    load_state_dict_into(net, given)
    assert_same(dict(net.state_dict()), {k: v for k, (v, _) in snapshot.items()})
    assert list(given) == list(snapshot)
    for key, (tensor, copy) in snapshot.items():
        assert given[key] is tensor and torch.equal(tensor, copy)


def test_wrong_keys_message_counts_and_examples(
    net: nn.Module, weights: dict[str, torch.Tensor]
) -> None:
    state = {k: v for k, v in weights.items() if not k.startswith("1.")}  # drop 5 BN entries
    state.update({f"extra.{i}": torch.zeros(1) for i in range(4)})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_into(net, {k: v + 1 for k, v in state.items()})
    message = str(caught.value)
    assert "\n" not in message
    assert "5 missing keys (e.g. 1.weight, 1.bias, 1.running_mean, ...)" in message
    assert "4 unexpected keys (e.g. extra.0, extra.1, extra.2, ...)" in message
    assert_same(dict(net.state_dict()), before)  # nothing was loaded


def test_shape_mismatch_message_shows_both_shapes(
    net: nn.Module, weights: dict[str, torch.Tensor]
) -> None:
    state = dict(weights)
    state["5.weight"] = torch.zeros(10, 4)
    state["5.bias"] = torch.zeros(10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as caught:
        load_state_dict_into(net, state)
    message = str(caught.value)
    assert "2 shape mismatches" in message
    assert "5.weight: checkpoint (10, 4) vs model (5, 4)" in message
    assert "5.bias: checkpoint (10) vs model (5)" in message
    assert "missing" not in message and "unexpected" not in message
    assert_same(dict(net.state_dict()), before)


def test_single_missing_key_is_singular(net: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = dict(weights)
    del state["0.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key \(e\.g\. 0\.bias\)"):
        load_state_dict_into(net, state)


def test_non_tensor_entries_are_refused(net: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state: dict[str, Any] = dict(weights)
    state["0.weight"] = [[1.0]]
    with pytest.raises(CheckpointError, match=r"must be tensors; 1 are not \(e\.g\. 0\.weight\)"):
        load_state_dict_into(net, state)


def test_failing_torch_load_restores_the_model(
    net: nn.Module, weights: dict[str, torch.Tensor]
) -> None:
    # Keys and shapes fit, but a load hook on the last layer fails after the first layers
    # were copied: the model must come back as it was.
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("custom loader refused")

    net.get_submodule("5").register_load_state_dict_pre_hook(refuse)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="RuntimeError: custom loader refused"):
        load_state_dict_into(net, state)
    assert_same(dict(net.state_dict()), before)


def test_a_state_dict_without_version_metadata_loads_into_mnasnet(tv_model) -> None:
    """MNASNet refuses a state dict with no module versions (as a safetensors file has)."""
    from ulsam_inject.io.checkpoints import load_state_dict_into

    source, target = tv_model("mnasnet0_5"), tv_model("mnasnet0_5", dropout=0.3)
    torch.nn.init.normal_(source.classifier[1].weight)
    plain = {k: v.clone() for k, v in source.state_dict().items()}  # no _metadata
    load_state_dict_into(target, plain)
    assert torch.equal(target.classifier[1].weight, source.classifier[1].weight)
