"""A readable, per-subspace ULSAM written from the paper's equations (not imported from anywhere).

This is the yardstick the vectorized :class:`ulsam_inject.ULSAM` is tested and benchmarked
against. Its state dict has the reference code's layout (``subspaces.{n}.conv_dws.*``,
``.bn_dws.*``, ``.conv_point.*``, ``.bn_point.*``), so weights move between the two with
:meth:`ULSAM.from_reference_state_dict` and :meth:`ULSAM.to_reference_state_dict`.

It pools the depthwise branch, as the paper's equations and the authors' fixed code do (the
blog listing the project started from pooled the raw input instead; see ../shared/ULSAM.md).
"""

from __future__ import annotations

import torch
from torch import nn


class ReferenceSubspace(nn.Module):
    """One subspace: DW 1x1, BN, ReLU, maxpool 3x3/1, PW to one map, BN, ReLU, softmax."""

    def __init__(self, channels: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.conv_dws = nn.Conv2d(channels, channels, kernel_size=1, groups=channels)
        self.bn_dws = nn.BatchNorm2d(channels, momentum=momentum)
        self.relu_dws = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.conv_point = nn.Conv2d(channels, 1, kernel_size=1)
        self.bn_point = nn.BatchNorm2d(1, momentum=momentum)
        self.relu_point = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu_dws(self.bn_dws(self.conv_dws(x)))
        out = self.maxpool(out)
        out = self.relu_point(self.bn_point(self.conv_point(out)))
        b, _, h, w = out.shape
        attention = torch.softmax(out.view(b, 1, h * w), dim=2).view(b, 1, h, w)
        return x + attention * x


class ReferenceULSAM(nn.Module):
    """The per-subspace loop: chunk channels into ``groups`` subspaces, attend, concatenate.

    The default momentum is the reference code's 0.9 (PyTorch convention), so that a model
    trained with the reference code is reproduced step for step.

    Example:
        >>> import torch
        >>> ref = ReferenceULSAM(16, groups=4).eval()
        >>> ref(torch.randn(2, 16, 7, 7)).shape
        torch.Size([2, 16, 7, 7])
    """

    def __init__(self, channels: int, groups: int = 4, momentum: float = 0.9) -> None:
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"groups={groups} must be a positive divisor of channels={channels}")
        self.groups = groups
        self.subspaces = nn.ModuleList(
            ReferenceSubspace(channels // groups, momentum) for _ in range(groups)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(x, self.groups, dim=1)
        return torch.cat([sub(chunk) for sub, chunk in zip(self.subspaces, chunks)], dim=1)
