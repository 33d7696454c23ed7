"""Which code path runs a ULSAM call: one decision, from device, dtype, autocast and mode.

The plain module-by-module computation (:meth:`ULSAM.forward_plain`) is the rule: it is
correct on every device and dtype PyTorch's own layers support, inside ``torch.autocast``,
and it is what tracers, compilers and dispatch modes must see. A fast path is an
exception, taken only where it was written and measured:

- ``cpu-streaming``: eval (BatchNorms on running statistics), no gradient wanted, CPU,
  float32. Folded BatchNorms, a few samples at a time through cache-sized buffers
  (:mod:`.inference`). Measured on a 2-core CPU (benchmarks/bench_block.py).
- ``cpu-training``: training or gradients wanted, CPU, float32: one autograd function with
  its own backward (:mod:`.training`), measured likewise.
- ``cuda-fused``: eval, no gradient wanted, CUDA, float32/float16/bfloat16, where Triton
  imports: the logits in one Triton kernel over folded BatchNorms, then softmax and
  ``x + A * x`` (:mod:`.gpu`). Measured on an H200 (benchmarks/bench_cuda.py).

Everything else (autocast on, half precision on the CPU, other devices, ``meta``, tracing)
runs ``plain``.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from ulsam_inject.block import gpu
from ulsam_inject.block.inference import Sources
from ulsam_inject.block.training import uses_batch_stats


class BlockPath(str, Enum):
    """The code paths a ULSAM call can take (see the module docstring)."""

    PLAIN = "plain"
    CPU_STREAMING = "cpu-streaming"
    CPU_TRAINING = "cpu-training"
    CUDA_FUSED = "cuda-fused"


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (fake tensors, ``FlopCounterMode``, ...) is active.

    Such modes must see the plain ops: a fast path would hide the convolutions from a FLOP
    counter and call kernels fake tensors cannot run. PyTorch has no public query for the
    dispatch-mode stack; this private one has existed since torch 2.0, and
    tests/block/test_dispatch.py fails loudly if it disappears or stops reporting modes.
    """
    return bool(torch._C._len_torch_dispatch_stack() > 0)


def autocast_on(device_type: str) -> bool:
    """Whether ``torch.autocast`` is active for ``device_type`` (e.g. ``"cpu"``, ``"cuda"``)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (TypeError, RuntimeError):  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())


def choose_path(block: nn.Module, x: torch.Tensor, sources: Sources) -> BlockPath:
    """The path for ``block(x)``; ``sources`` are the block's :func:`fold_sources`.

    The cheap questions come first, so that a call bound for the plain ops (CUDA training,
    say) spends no time on the rest.
    """
    device = x.device.type
    if device not in ("cpu", "cuda"):
        return BlockPath.PLAIN
    if torch.jit.is_tracing() or dispatch_mode_active() or autocast_on(device):
        return BlockPath.PLAIN
    modules = block._modules
    batch_stats = uses_batch_stats(modules["dw_bn"]) or uses_batch_stats(modules["pw_bn"])
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in sources[:8])
    )
    if device == "cpu":
        if x.dtype != torch.float32:
            return BlockPath.PLAIN
        path = BlockPath.CPU_TRAINING if batch_stats or wants_grad else BlockPath.CPU_STREAMING
    elif (
        batch_stats
        or wants_grad
        or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        or not gpu.available()
    ):
        return BlockPath.PLAIN
    else:
        path = BlockPath.CUDA_FUSED
    if any(t is not None and (t.device != x.device or t.dtype != x.dtype) for t in sources):
        return BlockPath.PLAIN  # mixed devices or dtypes: PyTorch's own ops decide
    return path


__all__ = ["BlockPath", "autocast_on", "choose_path", "dispatch_mode_active"]
