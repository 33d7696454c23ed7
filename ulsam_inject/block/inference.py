"""ULSAM at inference (eval mode, no gradient): folded BatchNorms, a streaming pass.

Both conv + BatchNorm pairs on running statistics are affine maps, folded once into a
per-channel scale and shift (depthwise) and a (g, C/g) matrix and bias (pointwise), and
cached until a parameter or buffer changes. The block then runs a few samples at a time
through buffers that stay in cache: affine map + ReLU, the separable 3x3 max, the
pointwise conv as matrix-vector products, softmax, and ``x + A * x`` for those samples,
so that the input is read from memory once and the output written once.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from ulsam_inject.block.maxpool import PaddedMax3x3, interior, padded_planes

CHUNK_ELEMENTS = 1 << 19
"""Elements per chunk (2 MiB of float32): measured fastest from 1 x 96 x 14 x 14 to
32 x 512 x 14 x 14 on a 2-core CPU with 2 MiB of L2 per core (benchmarks/bench_block.py)."""


WORKSPACES = 8
"""Workspaces kept per thread: one per input shape, for a model's blocks at a few shapes."""

_WORKSPACES = threading.local()


class Folded(NamedTuple):
    """Both conv + eval-mode BN pairs as affine maps: dw = x * scale + shift, pw = W @ p + b."""

    scale: torch.Tensor  # (C,)
    shift: torch.Tensor  # (C,)
    zeros: torch.Tensor  # (C,), running mean that makes the BatchNorm kernel an affine map
    ones: torch.Tensor  # (C,), running variance likewise
    pw_weight: torch.Tensor  # (g, 1, C/g)
    pw_bias: torch.Tensor  # (1, g, 1, 1)


Sources = tuple[torch.Tensor | None, ...]
"""The tensors the folded parameters come from: 8 parameters, then 4 buffers."""

# Folded parameters per block, with the identity and version of every tensor they came
# from. A module-level weak map rather than an attribute: nothing is added to the block, so
# state_dict, pickling, deepcopy and tracing see exactly the declared parameters.
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], Sources, Folded]] = (
    weakref.WeakKeyDictionary()
)


def fold_sources(block: nn.Module) -> Sources:
    """The 8 parameters and 4 running statistics of ``block`` (a ULSAM), in a fixed order."""
    # Straight from the module dicts: nn.Module.__getattr__ costs ~0.5 us a lookup, a
    # tenth of the block's whole inference time at batch 1 when done 16 times.
    modules = block._modules
    try:
        dw, dw_bn = modules["dw"]._parameters, modules["dw_bn"]._parameters  # type: ignore[union-attr]
        pw, pw_bn = modules["pw"]._parameters, modules["pw_bn"]._parameters  # type: ignore[union-attr]
        dw_stats, pw_stats = modules["dw_bn"]._buffers, modules["pw_bn"]._buffers  # type: ignore[union-attr]
        return (
            dw["weight"], dw["bias"], dw_bn["weight"], dw_bn["bias"],
            pw["weight"], pw["bias"], pw_bn["weight"], pw_bn["bias"],
            dw_stats["running_mean"], dw_stats["running_var"],
            pw_stats["running_mean"], pw_stats["running_var"],
        )  # fmt: skip
    except KeyError:  # e.g. a parametrized weight: a property, not an entry
        m: Any = block
        return (
            m.dw.weight, m.dw.bias, m.dw_bn.weight, m.dw_bn.bias,
            m.pw.weight, m.pw.bias, m.pw_bn.weight, m.pw_bn.bias,
            m.dw_bn.running_mean, m.dw_bn.running_var,
            m.pw_bn.running_mean, m.pw_bn.running_var,
        )  # fmt: skip


def folded(block: nn.Module, sources: Sources) -> Folded:
    """The folded parameters of ``block``, recomputed only when a source has changed.

    The key holds each source tensor's address and version counter: in-place updates
    (optimizer steps, ``load_state_dict``) bump the version, replacing ``.data`` or
    converting the module changes the address. The cache keeps the source tensors alive
    so that an address cannot be reused by a different tensor while cached.
    """
    m: Any = block
    try:
        key = (
            tuple([None if t is None else (t.data_ptr(), t._version) for t in sources]),
            m.dw_bn.eps,
            m.pw_bn.eps,
        )
    except RuntimeError:  # inference tensors keep no version counter: no caching
        return _fold(sources, m.dw_bn.eps, m.pw_bn.eps)
    entry = _CACHE.get(block)
    if entry is not None and entry[0] == key:
        return entry[2]
    result = _fold(sources, m.dw_bn.eps, m.pw_bn.eps)
    _CACHE[block] = (key, sources, result)
    return result


def _fold(sources: Sources, dw_eps: float, pw_eps: float) -> Folded:
    dw_w, dw_b, dw_gamma, dw_beta, pw_w, pw_b, pw_gamma, pw_beta = sources[:8]
    dw_mean, dw_var, pw_mean, pw_var = sources[8:]
    assert dw_w is not None and pw_w is not None
    assert dw_mean is not None and dw_var is not None
    assert pw_mean is not None and pw_var is not None
    c, g = dw_w.shape[0], pw_w.shape[0]
    dtype = dw_w.dtype
    if dtype in (torch.float16, torch.bfloat16):
        # Fold in float32 and round once at the end: the plain BatchNorm kernels compute in
        # float32 too, so the folded block stays within one rounding of them.
        dw_w, dw_b, dw_gamma, dw_beta, pw_w, pw_b, pw_gamma, pw_beta, *stats = (
            None if t is None else t.float() for t in sources
        )
        dw_mean, dw_var, pw_mean, pw_var = stats
        assert dw_w is not None and pw_w is not None
        assert dw_mean is not None and dw_var is not None
        assert pw_mean is not None and pw_var is not None
    with torch.no_grad(), torch.inference_mode(False):
        scale, beta = _bn_scale_shift(dw_var, dw_gamma, dw_beta, dw_eps)
        dw_scale = dw_w.view(c) * scale
        dw_shift = (_or_zeros(dw_b, c, dw_w) - dw_mean) * scale + beta
        scale, beta = _bn_scale_shift(pw_var, pw_gamma, pw_beta, pw_eps)
        pw_weight = pw_w.view(g, 1, c // g) * scale.view(g, 1, 1)
        pw_bias = (_or_zeros(pw_b, g, pw_w) - pw_mean) * scale + beta
        return Folded(
            dw_scale.contiguous().to(dtype),
            dw_shift.contiguous().to(dtype),
            torch.zeros_like(dw_scale, dtype=dtype),
            torch.ones_like(dw_scale, dtype=dtype),
            pw_weight.contiguous().to(dtype),
            pw_bias.view(1, g, 1, 1).to(dtype),
        )


def _bn_scale_shift(
    var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm on running statistics as ``y = (x - mean) * scale + beta``: (scale, beta)."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    return scale, beta if beta is not None else torch.zeros_like(scale)


def _or_zeros(bias: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else like.new_zeros(n)


class _Workspace:
    """Buffers and views for chunks of ``n`` samples of (C, H, W) with g groups.

    The pooling buffers are in the padded layout of :func:`padded_planes`, with pads 0
    rather than -inf: the pooled values come after a ReLU. Only their interiors are ever
    written, and the pool leaves ``rows[0]`` and ``pooled``'s last pad row alone, so those
    stay 0. The views are made once: at batch 1, making them costs as much as some of the
    ops that use them.
    """

    __slots__ = ("interior", "logits", "planes", "pool")

    def __init__(self, n: int, c: int, h: int, w: int, g: int, like: torch.Tensor) -> None:
        source, rows, pooled = (padded_planes(n * c, h, w, like, 0.0) for _ in range(3))
        self.interior = interior(source, n * c, h, w).unflatten(0, (n, c))
        self.pool = PaddedMax3x3(source, rows, pooled, w)
        plane = (h + 1) * (w + 1)  # a plane with its pads, as the matmul reads it
        self.planes = pooled[w + 1 :].view(n, g, c // g, plane)
        self.logits = like.new_empty(n, g, 1, plane)


def _workspace(n: int, x: torch.Tensor, g: int) -> _Workspace:
    """The :class:`_Workspace` for chunks of ``n`` samples of ``x``'s shape.

    Kept per thread (so that concurrent calls never share one) for the next calls of the
    same shape: fresh buffers of a few MiB cost more to allocate and fault in than the
    block's work on them.
    """
    key = (n, *x.shape[1:], g, x.dtype, x.device)
    cache: dict[tuple[Any, ...], _Workspace] = _WORKSPACES.__dict__.setdefault("cache", {})
    space = cache.get(key)
    if space is None:
        if len(cache) >= WORKSPACES:
            del cache[next(iter(cache))]
        _, c, h, w = x.shape
        # Normal tensors, even when made under inference_mode: a later call outside it
        # (no_grad only) may not write into inference tensors.
        with torch.inference_mode(False):
            space = cache[key] = _Workspace(n, c, h, w, g, x)
    return space


def inference_forward(x: torch.Tensor, parameters: Folded) -> torch.Tensor:
    """The block on ``x`` (B, C, H, W) with folded parameters; the output keeps x's layout."""
    b, c, h, w = x.shape
    g = parameters.pw_weight.shape[0]
    n = max(1, min(b, CHUNK_ELEMENTS // (c * h * w)))
    space = _workspace(n, x, g)
    out = torch.empty_like(x)
    if n == b:  # one chunk: no slicing
        _forward_chunk(x, out, parameters, space)
    else:
        for start in range(0, b, n):
            stop = min(b, start + n)
            _forward_chunk(x[start:stop], out[start:stop], parameters, space)
    return out


def _forward_chunk(
    x: torch.Tensor, out: torch.Tensor, parameters: Folded, space: _Workspace
) -> None:
    """The block on a chunk of samples ``x``, into ``out``, in ``space``. A last chunk
    smaller than the workspace pools stale planes too (their logits are not used)."""
    m, _, h, w = x.shape
    g, _, width = parameters.pw_weight.shape
    # conv + BN folded into one per-channel affine map, run by the eval BatchNorm kernel
    # (mean 0, variance 1, eps 0: exactly x * scale + shift), several times faster than
    # addcmul with broadcast operands; then ReLU, written into the padded layout.
    dw = torch.batch_norm(
        x, parameters.scale, parameters.shift, parameters.zeros, parameters.ones,
        False, 0.0, 0.0, False,
    )  # fmt: skip
    interior_, planes, logits = space.interior, space.planes, space.logits
    if m < interior_.shape[0]:
        interior_, planes, logits = interior_[:m], planes[:m], logits[:m]
    torch.clamp_min(dw, 0.0, out=interior_)
    space.pool()
    # The grouped pointwise conv as batched matrix-vector products over the pooled planes
    # with their pads (far faster than a grouped conv at small batch); the logits at the
    # pads are dropped.
    torch.matmul(parameters.pw_weight, planes, out=logits)
    part = logits.view(m, g, h + 1, w + 1)[:, :, :h, :w] + parameters.pw_bias
    attention = torch.softmax(part.relu_().view(m, g, h * w), -1)
    # While this chunk of x is still in cache: x + A * x.
    x5 = x.unflatten(1, (g, width))
    torch.addcmul(x5, x5, attention.view(m, g, 1, h, w), out=out.unflatten(1, (g, width)))
