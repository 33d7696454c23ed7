"""ULSAM at inference on CUDA: the attention logits in one Triton kernel, then two ops.

The plain computation runs nine whole-tensor ops (two convs, two BatchNorms, two ReLUs,
the max-pool, softmax, ``x + A * x``), each a pass over memory and a kernel launch. With
both BatchNorms folded (:func:`ulsam_inject.block.inference.folded`), everything up to the
(B, g, H, W) logits is, per output position and group,

    logit = ReLU(bias_g + sum over the group's channels c of
                 w_c * max over the 3x3 neighbourhood of ReLU(scale_c * x + shift_c))

which one kernel computes reading x once (neighbours come from cache). Padding may count
as 0 instead of -inf: the max always includes the centre, which is >= 0 after ReLU. Then
softmax over H*W (a small tensor) and ``x + A * x`` run as PyTorch ops: three launches in
all. Accumulation is float32 whatever the input dtype.

Only imported where ``triton`` is; :func:`available` says whether this path can run.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ulsam_inject.block.inference import Folded


@functools.cache
def available() -> bool:
    """Whether Triton imports (it ships with PyTorch's CUDA wheels on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def logits_kernel(
        x_ptr, scale_ptr, shift_ptr, weight_ptr, bias_ptr, out_ptr,
        stride_b, stride_c, stride_h, stride_w,
        groups, width, height, cols,
        CHANNELS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program: one (sample, group) pair and BLOCK positions of its map; the group's
        # channels CHANNELS at a time, as a (CHANNELS, BLOCK) tile, so that many loads are
        # in flight at once and a channels_last input is read along its contiguous axis.
        row = tl.program_id(0)
        b = row // groups
        group = row % groups
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < height * cols
        i = offsets // cols
        j = offsets % cols
        acc = tl.full((BLOCK,), 0.0, tl.float32)
        for k in range(0, width, CHANNELS):
            lane = k + tl.arange(0, CHANNELS)
            live = lane < width
            c = group * width + lane
            scale = tl.load(scale_ptr + c, mask=live, other=0.0).to(tl.float32)[:, None]
            shift = tl.load(shift_ptr + c, mask=live, other=0.0).to(tl.float32)[:, None]
            weight = tl.load(weight_ptr + c, mask=live, other=0.0).to(tl.float32)
            base = x_ptr + b * stride_b + c[:, None] * stride_c
            pooled = tl.full((CHANNELS, BLOCK), 0.0, tl.float32)  # ReLU's floor, and padding
            for di in tl.static_range(3):
                for dj in tl.static_range(3):
                    ii = i + (di - 1)
                    jj = j + (dj - 1)
                    ok = inside & (ii >= 0) & (ii < height) & (jj >= 0) & (jj < cols)
                    mask = live[:, None] & ok[None, :]
                    where = base + (ii * stride_h + jj * stride_w)[None, :]
                    value = tl.load(where, mask=mask, other=0.0).to(tl.float32) * scale + shift
                    pooled = tl.maximum(pooled, tl.where(mask, value, 0.0))
            acc += tl.sum(pooled * weight[:, None], axis=0)
        logit = tl.maximum(acc + tl.load(bias_ptr + group).to(tl.float32), 0.0)
        tl.store(out_ptr + row * height * cols + offsets, logit, mask=inside)

    return logits_kernel


TILE = 2048
"""Elements of a program's (channels, positions) tile: 16 float32 registers a thread at
Triton's default 4 warps."""

WIDE_MAP = 128
"""From this many positions on, a program takes one channel at a time over up to 1024
positions; below it, as many channels as fill :data:`TILE`. Measured on an H200
(benchmarks/bench_cuda.py, relative to SE in the same run): channel tiles took
128x1280x7x7 from 2.21x to 1.07x SE, but 256x144x56x56 from 2.2x to 6.4x and bf16
128x512x14x14 from 1.80x to 2.12x."""


def tile_shape(positions: int, width: int, pairs: int) -> tuple[int, int]:
    """(channels, positions) per program for a map of ``positions`` H*W positions, groups of
    ``width`` channels and ``pairs`` (sample, group) pairs: smaller position tiles while
    fewer than 512 programs would run (a wide map) or 256 (a narrow one)."""
    block = 1 << max(5, (positions - 1).bit_length())
    if positions >= WIDE_MAP:
        while block > 64 and pairs * -(-positions // block) < 512:
            block //= 2
        return 1, min(block, 1024)
    while block > 32 and pairs * -(-positions // block) < 256:
        block //= 2
    return min(1 << max(0, (width - 1).bit_length()), TILE // block), block


def attention_logits(x: torch.Tensor, parameters: Folded) -> torch.Tensor:
    """The (B, g, H*W) float32 logits ``ReLU(PW(maxpool(ReLU(DW(x)))))`` with folded BNs."""
    b, c, h, w = x.shape
    g = parameters.pw_weight.shape[0]
    out = torch.empty((b, g, h * w), device=x.device, dtype=torch.float32)
    channels, block = tile_shape(h * w, c // g, b * g)
    grid = (b * g, -(-(h * w) // block))
    _kernel()[grid](
        x, parameters.scale, parameters.shift, parameters.pw_weight, parameters.pw_bias, out,
        *x.stride(), g, c // g, h, w,
        CHANNELS=channels, BLOCK=block,
    )  # fmt: skip
    return out


def gpu_inference_forward(x: torch.Tensor, parameters: Folded) -> torch.Tensor:
    """The block on ``x`` (B, C, H, W) with folded parameters: kernel, softmax, x + A * x."""
    b, c, h, w = x.shape
    g = parameters.pw_weight.shape[0]
    attention = torch.softmax(attention_logits(x, parameters), dim=-1).to(x.dtype)
    x5 = x.unflatten(1, (g, c // g))
    return torch.addcmul(x5, x5, attention.view(b, g, 1, h, w)).flatten(1, 2)
