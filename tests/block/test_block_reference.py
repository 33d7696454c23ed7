"""ULSAM against the per-subspace reference loop: outputs, gradients, running statistics.

Weights move with ``ULSAM.from_reference_state_dict``; gradients are mapped back to the
block's layout by concatenating the reference's per-subspace gradients (independently of
the conversion code). BatchNorm running statistics and affine parameters are randomized,
so that eval mode (running statistics) is a real test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ulsam_inject.block.module import REFERENCE_MOMENTUM, ULSAM
from ulsam_inject.block.reference import ReferenceULSAM
from ulsam_inject.errors import BlockConfigError

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-11}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random conv weights, BN affine parameters, running statistics and batch counters."""
    gen = torch.Generator().manual_seed(seed)
    count = int(torch.randint(0, 50, (1,), generator=gen))  # the same in every subspace
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.7)
                assert sub.bias is not None
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=gen) * 0.3)
            elif isinstance(sub, nn.BatchNorm2d):
                assert sub.running_mean is not None and sub.running_var is not None
                assert sub.num_batches_tracked is not None
                sub.running_mean.copy_(torch.randn(sub.running_mean.shape, generator=gen) * 0.5)
                sub.running_var.copy_(torch.rand(sub.running_var.shape, generator=gen) * 1.5 + 0.5)
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * 0.3 + 1.0)
                sub.bias.copy_(torch.randn(sub.bias.shape, generator=gen) * 0.3)
                sub.num_batches_tracked.fill_(count)
    return module


def make_pair(
    channels: int, groups: int, dtype: torch.dtype, seed: int = 0
) -> tuple[ReferenceULSAM, ULSAM]:
    ref = randomize(ReferenceULSAM(channels, groups), seed).to(dtype)
    return ref, ULSAM.from_reference_state_dict(ref.state_dict())


def reference_grads(ref: ReferenceULSAM) -> dict[str, torch.Tensor]:
    """The reference's parameter gradients in the block's layout (concatenated subspaces)."""
    subs = list(ref.subspaces)

    def cat(get: str) -> torch.Tensor:
        parts = []
        for sub in subs:
            grad = sub.get_parameter(get).grad
            assert grad is not None, get
            parts.append(grad)
        return torch.cat(parts)

    return {
        "dw.weight": cat("conv_dws.weight"),
        "dw.bias": cat("conv_dws.bias"),
        "dw_bn.weight": cat("bn_dws.weight"),
        "dw_bn.bias": cat("bn_dws.bias"),
        "pw.weight": cat("conv_point.weight"),
        "pw.bias": cat("conv_point.bias"),
        "pw_bn.weight": cat("bn_point.weight"),
        "pw_bn.bias": cat("bn_point.bias"),
    }


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare_step(
    ref: ReferenceULSAM,
    block: ULSAM,
    x: torch.Tensor,
    *,
    train: bool,
    tol: float,
    seed: int = 1,
) -> None:
    """One forward + backward of both: outputs, input and parameter gradients, buffers.

    Outputs and input gradients agree to ``tol``. So do parameter gradients and running
    statistics in float64; in float32 they are sums over B*H*W terms through BatchNorm's
    backward, which over a few nearly equal values amplifies rounding: the float32 error
    (against float64) of the reference, or of the block run module by module, is then
    often above 1e-5, and ours must be within ``tol`` (relative to the gradients' scale
    where that exceeds 1) or 10x that error.
    """
    truth = plain = None
    if x.dtype != torch.float64:
        truth = run_step(copy.deepcopy(ref).double(), x.double(), train=train, seed=seed)
        plain = run_step(PlainULSAM(copy.deepcopy(block)), x, train=train, seed=seed)
    ours = run_step(block, x, train=train, seed=seed)
    theirs = run_step(ref, x, train=train, seed=seed)
    for name, want in theirs.items():
        diff = max_diff(ours[name], want)
        allowed = tol
        if truth is not None and plain is not None and name not in ("output", "input.grad"):
            scale = max(1.0, truth[name].abs().max().item())
            noise = max(max_diff(want, truth[name]), max_diff(plain[name], truth[name]))
            allowed = max(tol * scale, 10 * noise)
        assert diff <= allowed, f"{name}: differs by {diff:.3g} > {allowed:.3g}"


class PlainULSAM(nn.Module):
    """A block run module by module (``forward_plain``): one more float32 computation of
    the same sums, to size their rounding noise."""

    def __init__(self, block: ULSAM) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.forward_plain(x)


def run_step(
    module: nn.Module, x: torch.Tensor, *, train: bool, seed: int
) -> dict[str, torch.Tensor]:
    """Output, gradients (in the block's layout) and buffers after one forward + backward."""
    module.train(train)
    module.zero_grad()
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
    inp = x.clone().requires_grad_()
    out = module(inp)
    out.backward(grad_out)
    assert inp.grad is not None
    result = {"output": out.detach(), "input.grad": inp.grad}
    if isinstance(module, PlainULSAM):
        module = module.block
    if isinstance(module, ReferenceULSAM):
        grads = reference_grads(module)
        buffers = ULSAM.from_reference_state_dict(module.state_dict()).state_dict()
    else:
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        buffers = module.state_dict()
    for name, grad in grads.items():
        result[f"{name}.grad"] = grad.reshape(-1)
    for name in ("dw_bn.running_mean", "dw_bn.running_var", "pw_bn.running_mean",
                 "pw_bn.running_var", "dw_bn.num_batches_tracked"):  # fmt: skip
        result[name] = buffers[name]
    return result


SHAPES = [  # (batch, height, width): non-square, H or W = 1 or 2, batch 1 and more
    (1, 5, 7),
    (3, 4, 3),
    (2, 1, 6),
    (2, 6, 1),
    (1, 6, 1),
    (2, 2, 2),
    (4, 1, 1),
]
ILL_CONDITIONED = 12
"""In train mode, BatchNorm over fewer values per channel than this can amplify float32
rounding far beyond 1e-5 (with gradients that are zero in exact arithmetic computed as
noise): such shapes are compared in float64 only."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8, 16])
def test_matches_reference(groups: int, train: bool, dtype: torch.dtype) -> None:
    for width in (1, 3):
        channels = groups * width
        ref, block = make_pair(channels, groups, dtype, seed=groups * 10 + width)
        for i, (batch, h, w) in enumerate(SHAPES):
            if train and dtype == torch.float32 and batch * h * w < ILL_CONDITIONED:
                continue
            x = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(i))
            compare_step(ref, block, x.to(dtype), train=train, tol=TOLERANCE[dtype], seed=i)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_reference_at_a_real_size(train: bool) -> None:
    """A MobileNet-sized activation in float64 (float32 sums over 2 x 14 x 14 values differ
    in their last bits, with gradients in the tens)."""
    ref, block = make_pair(64, 4, torch.float64, seed=3)
    x = torch.randn(2, 64, 14, 14, dtype=torch.float64)
    compare_step(ref, block, x, train=train, tol=1e-10)


def test_float32_at_a_real_size() -> None:
    """2 x 128 x 14 x 14 in float32: outputs and input gradients within 1e-5 of the
    reference and of the float64 result; parameter gradients (sums over 392 positions, up
    to ~50) as in :func:`compare_step`."""
    ref, block = make_pair(128, 4, torch.float32, seed=4)
    x = torch.randn(2, 128, 14, 14)
    for train in (True, False):
        truth = run_step(copy.deepcopy(block).double(), x.double(), train=train, seed=0)
        ours = run_step(copy.deepcopy(block), x, train=train, seed=0)
        compare_step(ref, block, x, train=train, tol=1e-5, seed=0)
        for name in ("output", "input.grad"):
            assert max_diff(ours[name], truth[name]) <= 1e-5, name


def test_running_stats_follow_the_reference_over_several_steps() -> None:
    """Momentum 0.9 carried over: statistics, counters and outputs agree step after step."""
    ref, block = make_pair(24, 4, torch.float64, seed=5)
    assert block.dw_bn.momentum == REFERENCE_MOMENTUM == block.pw_bn.momentum
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_blk = torch.optim.SGD(block.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(3, 24, 5, 6, dtype=torch.float64) + step
        compare_step(ref, block, x, train=True, tol=1e-10, seed=step)
        opt_ref.step()
        opt_blk.step()
        opt_ref.zero_grad()
        opt_blk.zero_grad()
    x = torch.randn(2, 24, 5, 6, dtype=torch.float64)
    compare_step(ref, block, x, train=False, tol=1e-10)
    assert int(block.dw_bn.num_batches_tracked) == int(ref.subspaces[0].bn_dws.num_batches_tracked)


@settings(max_examples=30, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4, 8, 16]),
    width=st.integers(1, 4),
    batch=st.integers(1, 3),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_random_shapes(
    groups: int, width: int, batch: int, h: int, w: int, train: bool, seed: int
) -> None:
    if train and batch * h * w < 2:
        return  # BatchNorm needs two values per channel: tested in test_block.py
    ref, block = make_pair(groups * width, groups, torch.float64, seed=seed)
    x = torch.randn(batch, groups * width, h, w, dtype=torch.float64)
    compare_step(ref, block, x, train=train, tol=1e-10, seed=seed)


def test_channels_last_and_strided_inputs_match_the_reference() -> None:
    ref, block = make_pair(32, 4, torch.float64, seed=6)
    base = torch.randn(2, 32, 6, 10, dtype=torch.float64)
    for x in (base.contiguous(memory_format=torch.channels_last), base[:, :, :, ::2]):
        for train in (True, False):
            compare_step(ref, block, x, train=train, tol=1e-10)


# -- conversion -------------------------------------------------------------------------


def test_to_reference_state_dict_round_trip() -> None:
    block = randomize(ULSAM(40, 8), seed=7)
    ref = ReferenceULSAM(40, 8)
    result = ref.load_state_dict(block.to_reference_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 40, 5, 4)
    for train in (False, True):
        ref.train(train)
        block.train(train)
        assert max_diff(block(x), ref(x)) <= 1e-5
    again = ULSAM.from_reference_state_dict(block.to_reference_state_dict())
    for key, value in block.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_from_reference_keeps_dtype_and_momentum() -> None:
    ref = ReferenceULSAM(12, 3).double()
    block = ULSAM.from_reference_state_dict(ref.state_dict())
    assert block.dw.weight.dtype == torch.float64
    assert (block.channels, block.groups) == (12, 3)
    assert block.dw_bn.momentum == 0.9 and block.pw_bn.momentum == 0.9
    other = ULSAM.from_reference_state_dict(ref.state_dict(), momentum=0.1, eps=1e-3)
    assert other.dw_bn.momentum == 0.1 and other.pw_bn.eps == 1e-3


def _reference_sd() -> dict[str, torch.Tensor]:
    return dict(ReferenceULSAM(8, 2).state_dict())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.update({"head.weight": torch.zeros(1)}),
            "unexpected keys, e.g. head.weight",
        ),
        (lambda sd: sd.clear(), "must hold subspaces 0..g-1, found []"),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("subspaces.0.")],
            "must hold subspaces 0..g-1, found [1]",
        ),
        (lambda sd: sd.pop("subspaces.1.bn_point.running_var"), "missing subspaces.1.bn_point"),
        (
            lambda sd: sd.update({"subspaces.1.conv_point.weight": torch.zeros(2, 4, 1, 1)}),
            "subspaces.1.conv_point.weight has shape (2, 4, 1, 1), expected (1, 4, 1, 1)",
        ),
        (lambda sd: sd.pop("subspaces.0.conv_dws.weight"), "no 'subspaces.0.conv_dws.weight'"),
    ],
    ids=["unexpected", "empty", "gap", "missing", "shape", "no-first-weight"],
)
def test_bad_reference_state_dicts(edit: object, message: str) -> None:
    sd = _reference_sd()
    edit(sd)  # type: ignore[operator]
    with pytest.raises(BlockConfigError) as info:
        ULSAM.from_reference_state_dict(sd)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_reference_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match="groups=3 must be a positive divisor of channels=8"):
        ReferenceULSAM(8, 3)
