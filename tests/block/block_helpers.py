"""Blocks with random weights and statistics, and comparisons, for the block's tests."""

from __future__ import annotations

import torch

from ulsam_inject.block.module import ULSAM


def random_block(channels: int, groups: int, seed: int = 0, **kwargs: float) -> ULSAM:
    """A block with random weights, BN affine parameters and running statistics."""
    torch.manual_seed(seed)
    block = ULSAM(channels, groups, **kwargs)
    with torch.no_grad():
        for bn in (block.dw_bn, block.pw_bn):
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.3)
            bn.bias.normal_(0, 0.3)
        block.dw.weight.normal_(0, 0.7)
    return block


def plain(block: ULSAM, x: torch.Tensor) -> torch.Tensor:
    """The unfolded, module-by-module computation (native max-pool, convs, BatchNorms)."""
    return block.forward_plain(x)


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and (a.double() - b.double()).abs().max().item() <= tol
