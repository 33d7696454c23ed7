"""The 3x3, stride-1, padding-1 max-pool of ULSAM, fast on contiguous NCHW CPU tensors.

PyTorch's CPU pooling kernel is about 10x slower on contiguous NCHW tensors than on
channels_last ones, and ULSAM pools every channel of its activation. Without autograd the
pool is computed as separable maxima of shifted slices (same values) over planes stored
with padding (:func:`padded_planes`); with autograd the native kernel runs on a
channels_last copy, whose backward is fast too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ulsam_inject.errors import BlockConfigError


def padded_planes(n: int, h: int, w: int, like: torch.Tensor, fill: float) -> torch.Tensor:
    """A flat buffer for ``n`` planes of H x W in the layout :class:`PaddedMax3x3` reads.

    One pad row in front, then each plane as H rows of W values plus one pad column,
    followed by one pad row: every neighbour of a value along the flat data that lies
    outside its plane is a pad. All entries start as ``fill``: ``-inf``, or 0 when the
    planes hold no negative values (a max over a window clipped at the border is the same).
    """
    return torch.full((w + 1 + n * (h + 1) * (w + 1),), fill, dtype=like.dtype, device=like.device)


def interior(flat: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The (n, H, W) values of a :func:`padded_planes` buffer, as a strided view."""
    return flat.as_strided((n, h, w), ((h + 1) * (w + 1), w + 1, 1), flat.storage_offset() + w + 1)


class PaddedMax3x3:
    """Maxima over each 3x3 window (clipped at the border) of the planes in a padded buffer.

    ``src``, ``rows`` and ``out`` are flat :func:`padded_planes` buffers of one size for
    planes of width ``w``; ``src``'s pads hold its fill, ``rows`` is scratch whose first
    entry holds it too. Calling the object writes the result into ``out``'s interior (its
    pads and its last pad row get values of no use): the max along W, then along H, each as
    two ``maximum`` ops over shifted 1-D slices of the flat data, one long vectorized loop
    each; the pads make the windows that run off a plane come out right without fixing up
    its edges. The slices are made once, here: at batch 1 making them would cost a third
    of the pool.
    """

    __slots__ = ("_steps",)

    def __init__(self, src: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, w: int) -> None:
        k = w + 1
        self._steps = (
            (src[:-2], src[1:-1], rows[1:-1]),
            (rows[1:-1], src[2:], rows[1:-1]),
            (rows[: -2 * k], rows[k:-k], out[k:-k]),
            (out[k:-k], rows[2 * k :], out[k:-k]),
        )

    def __call__(self) -> None:
        for a, b, result in self._steps:
            torch.maximum(a, b, out=result)


def _separable_max_3x3(x: torch.Tensor) -> torch.Tensor:
    """Max over each 3x3 window, clipped at the border (what padding with -inf gives)."""
    h, w = x.shape[-2:]
    planes = x.reshape(-1, h, w)
    n = planes.shape[0]
    src = padded_planes(n, h, w, x, float("-inf"))
    interior(src, n, h, w).copy_(planes)
    rows, out = torch.empty_like(src), torch.empty_like(src)
    rows[0] = src[0]
    PaddedMax3x3(src, rows, out, w)()
    return interior(out, n, h, w).contiguous().view(x.shape)


def max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """Same values as ``F.max_pool2d(x, 3, stride=1, padding=1)``, faster on NCHW CPU tensors.

    PyTorch's CPU pooling kernel is about 10x slower on contiguous NCHW tensors than on
    channels_last ones. Without autograd, separable maxima of shifted slices are used. With
    autograd, the native kernel runs on a channels_last copy (the result is channels_last):
    its backward is fast too and sends each gradient to the same element as the native op
    on the original layout, ties included.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.randn(2, 8, 5, 7)
        >>> torch.equal(max_pool_3x3(x), F.max_pool2d(x, 3, 1, 1))
        True
    """
    if x.dim() not in (3, 4):
        raise BlockConfigError(
            f"max_pool_3x3 expects a 3-D or 4-D tensor, got shape {tuple(x.shape)}"
        )
    if torch.is_grad_enabled() and x.requires_grad:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.max_pool2d(x, 3, 1, 1)
    return _separable_max_3x3(x)
