"""The separable 3x3 max-pool against PyTorch's own, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ulsam_inject.block.maxpool import max_pool_3x3
from ulsam_inject.errors import BlockConfigError


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 4),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    levels=st.sampled_from([3, 1000]),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "sliced", "3d"]),
    seed=st.integers(0, 2**16),
)
def test_max_pool_3x3_equals_native(
    n: int, c: int, h: int, w: int, levels: int, layout: str, seed: int
) -> None:
    """Values (negative ones, many ties with ``levels=3``) and layouts, with and without
    autograd; gradients go where the native op sends them, ties included."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels, (n, c, h, w), generator=gen).double() / 7
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.cat([x, x], 3)[..., ::2]
    elif layout == "3d":
        x = x[0]
    expected = F.max_pool2d(x, 3, 1, 1)
    got = max_pool_3x3(x)
    assert torch.equal(got, expected)
    assert x.data_ptr() != got.data_ptr()

    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    F.max_pool2d(a, 3, 1, 1).backward(grad)
    out = max_pool_3x3(b)
    assert torch.equal(out, expected)
    out.backward(grad)
    assert a.grad is not None and b.grad is not None
    assert torch.equal(b.grad, a.grad)


def test_max_pool_3x3_rejects_other_ranks() -> None:
    with pytest.raises(BlockConfigError, match="3-D or 4-D tensor, got shape"):
        max_pool_3x3(torch.randn(2, 2))
