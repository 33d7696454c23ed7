"""A representative subset of the compact-model zoo, end to end (benchmarks/zoo_sweep.py
runs the whole list): stages found, ULSAM after every stage, shapes kept, identity blocks
give the original outputs exactly, a train-mode backward pass reaches the blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from checks import assert_same_random_train_outputs

from ulsam_inject import ULSAM, find_stages, inject
from ulsam_inject.errors import PositionError
from ulsam_inject.surgery.rewrite import identity_blocks

# Zoo-wide: many models traced and rewritten (CI runs it; `-m 'not slow'` skips it).
pytestmark = pytest.mark.slow

SIZE = (3, 64, 64)

TORCHVISION = [
    # name, stages
    ("mobilenet_v3_small", 11),
    ("shufflenet_v2_x0_5", 16),
    ("mnasnet0_5", 17),
    ("efficientnet_b0", 16),
    ("regnet_x_400mf", 22),
]
TIMM = [
    # name, stages, untraceable submodules made leaves
    ("mobilenetv3_small_050", 11, 0),
    ("tf_mobilenetv3_small_minimal_100", 11, 0),  # TF "same" padding: Conv2dSame
    ("lcnet_050", 13, 0),
    ("ghostnet_050", 16, 0),
    ("mobilenetv4_conv_small", 12, 0),
    ("mobilevit_xxs", 7, 3),  # transformer blocks are leaves
    ("efficientvit_b0", 11, 4),  # attention modules are leaves
]


def _check_end_to_end(model: torch.nn.Module, expected_stages: int) -> dict[str, str]:
    stages = find_stages(model, SIZE)
    assert len(stages) == expected_stages
    assert [s.index for s in stages] == list(range(len(stages)))
    groups = {s.name: 4 if s.out_channels % 4 == 0 else 1 for s in stages}
    result = inject(model, at="all", groups=groups, input_size=SIZE, report=False)
    blocks = {n: m for n, m in result.model.named_modules() if isinstance(m, ULSAM)}
    assert len(blocks) == len(stages)
    assert [b.channels for b in blocks.values()] == [s.out_channels for s in stages]

    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = model(x)
        assert result.model.eval()(x).shape == expected.shape
        plain = identity_blocks(copy.deepcopy(result.model))
        assert torch.equal(plain(x), expected)

    result.model.train()
    result.model(x).square().mean().backward()
    for name, block in blocks.items():
        assert block.pw.weight.grad is not None, name
    return dict(result.leaves)


@pytest.mark.parametrize(("name", "count"), TORCHVISION)
def test_torchvision(tv_model, name, count):
    assert _check_end_to_end(tv_model(name), count) == {}


@pytest.mark.parametrize(("name", "count", "leaves"), TIMM)
def test_timm(timm_model, name, count, leaves):
    assert len(_check_end_to_end(timm_model(name), count)) == leaves


def test_positions_outside_leaves_work_and_inside_are_refused(timm_model):
    model = timm_model("mobilevit_xxs")
    result = inject(model, at="stages.2.0", input_size=SIZE, report=False)
    assert "stages.2.1" in result.leaves  # the MobileViT block after it is a leaf
    assert result.model(torch.randn(1, *SIZE)).shape == (1, 1000)
    with pytest.raises(
        PositionError, match=r"'stages\.2\.1\.transformer' lies inside 'stages\.2\.1'"
    ):
        inject(model, at="stages.2.1.transformer", input_size=SIZE, report=False)


def test_timm_weights_and_drop_path(timm_model):
    # timm's BatchNormAct2d is traced through (its num_batches_tracked is read as a plain
    # tensor) and its DropPath depends on self.training: neither may change the model,
    # lose a key, or freeze a mode.
    model = timm_model("mobilenetv3_small_050", drop_path_rate=0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = inject(model, at="all", input_size=SIZE, report=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    new = result.model.state_dict()
    assert all(torch.equal(new[k], v) for k, v in state.items())
    blocks = [n for n, m in result.model.named_modules() if isinstance(m, ULSAM)]
    assert all(k.startswith(tuple(f"{b}." for b in blocks)) for k in set(new) - set(state))
    assert all(reason == "its code depends on self.training" for reason in result.leaves.values())
    assert any(path.endswith("drop_path") for path in result.leaves)

    plain = identity_blocks(copy.deepcopy(result.model))
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model(x))
    assert_same_random_train_outputs(plain, model, x)
