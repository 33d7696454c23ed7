"""init=: how a new block starts ("default": PyTorch's init; "uniform": a flat attention map)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ulsam_inject import ULSAM, inject
from ulsam_inject.block.module import INITS, check_init
from ulsam_inject.errors import InitError, UlsamUsageError
from ulsam_inject.surgery.inject import _block_maker

SMALL = (3, 64, 64)
AT = ["features.13", "features.16"]


def _attention(block: ULSAM, x: torch.Tensor) -> torch.Tensor:
    """The block's attention map (B, g, H, W), computed op by op."""
    dw = F.relu(block.dw_bn(block.dw(x)))
    logits = F.relu(block.pw_bn(block.pw(F.max_pool2d(dw, 3, 1, 1))))
    return torch.softmax(logits.flatten(2), dim=-1).view_as(logits)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (7, 7), (14, 14)])
def test_uniform_starts_with_a_flat_map_and_a_constant_scale_in_eval_mode(size):
    torch.manual_seed(0)
    h, w = size
    block = ULSAM(32, groups=4, init="uniform").eval()
    x = 3 * torch.randn(2, 32, h, w) + 1
    with torch.no_grad():
        attention = _attention(block, x)
        assert torch.equal(attention, torch.full_like(attention, 1.0 / (h * w)))
        expected = x * (1 + 1.0 / (h * w))
        for out in (block(x), block.forward_plain(x)):
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_uniform_is_flat_in_train_mode_too_and_still_learns():
    torch.manual_seed(0)
    block = ULSAM(32, groups=4, init="uniform").train()
    x = torch.randn(4, 32, 6, 6, requires_grad=True)
    out = block(x)
    torch.testing.assert_close(out, x * (1 + 1 / 36), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(_attention(block, x), torch.full((4, 4, 6, 6), 1 / 36))
    (out * torch.randn_like(out)).sum().backward()
    # The logits are 1, not 0, so ReLU passes gradient; the BatchNorm weight gets it.
    assert block.pw_bn.weight.grad is not None and block.pw_bn.weight.grad.abs().min() > 0


def test_the_default_init_is_pytorchs_and_differs_from_uniform_only_in_the_pw_batchnorm():
    torch.manual_seed(5)
    default = ULSAM(32, groups=4)
    torch.manual_seed(5)
    uniform = ULSAM(32, groups=4, init="uniform")
    assert torch.equal(default.pw_bn.weight, torch.ones(4))
    assert torch.equal(uniform.pw_bn.weight, torch.zeros(4))
    assert torch.equal(uniform.pw_bn.bias, torch.ones(4))
    a, b = default.state_dict(), uniform.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["pw_bn.weight", "pw_bn.bias"]


def test_inject_uniform_gives_flat_blocks():
    torch.manual_seed(0)
    import torchvision

    net = torchvision.models.mobilenet_v2().eval()
    result = inject(net, at=AT, input_size=SMALL, init="uniform", report=False)
    blocks = [result.model.get_submodule(p.module_name) for p in result.plan.placements]
    assert len(blocks) == 2
    for block in blocks:
        assert isinstance(block, ULSAM)
        assert torch.equal(block.pw_bn.weight, torch.zeros(block.groups))
        assert torch.equal(block.pw_bn.bias, torch.ones(block.groups))
    assert result.plan.to_list()[0] == {"at": "features.13", "groups": 4, "mode": "after"}


@pytest.mark.parametrize("init", INITS)
def test_same_seed_same_blocks_bit_for_bit_for_each_init(tv_model, init):
    model = tv_model("mobilenet_v2")

    def blocks(seed: int) -> dict[str, torch.Tensor]:
        result = inject(model, at=AT, input_size=SMALL, report=False, seed=seed, init=init)
        return {k: v for k, v in result.model.state_dict().items() if ".ulsam." in k}

    torch.manual_seed(1)
    first = blocks(7)
    torch.manual_seed(2)
    again, other = blocks(7), blocks(8)
    assert first and first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("bad", ["zeros", "Uniform", "", 3, None, ["uniform"], b"uniform"])
def test_bad_inits_are_refused_before_any_surgery(tv_model, bad):
    model = tv_model("mobilenet_v2")
    with pytest.raises(InitError, match="is not one of: default, uniform") as caught:
        inject(model, at=AT, input_size=SMALL, init=bad)
    assert isinstance(caught.value, UlsamUsageError) and caught.value.exit_code == 2
    assert "\n" not in str(caught.value)
    with pytest.raises(InitError):
        ULSAM(32, groups=4, init=bad)
    with pytest.raises(InitError):
        _block_maker(model, None, bad)
    with pytest.raises(InitError):
        check_init(bad)


def test_a_long_bad_init_is_cut_in_the_message():
    with pytest.raises(InitError) as caught:
        check_init("x" * 10_000)
    assert len(str(caught.value)) < 200
