"""torch.distributed for fine-tuning: started by torchrun, data-parallel, rank 0 speaks.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` joins the process group they describe (gloo on the
CPU, nccl on CUDA, one GPU per process) and returns a :class:`DistContext`. Without those
variables (or with a world of one) everything runs in this process alone.

BatchNorm across processes (``sync_bn``): on CUDA torch's ``SyncBatchNorm``; on the CPU,
where ``SyncBatchNorm`` does not run, :class:`GlooSyncBatchNorm` all-reduces the batch
statistics (differentiably) over gloo. ULSAM blocks then take their plain path, whose
BatchNorms are these modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ulsam_inject.errors import UlsamUsageError

__all__ = [
    "DistContext",
    "GlooSyncBatchNorm",
    "all_reduce_sum",
    "convert_sync_bn",
    "init_from_env",
    "resolve_device",
]


CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; CUDA takes the local rank's GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise UlsamUsageError(f"device {device!r} is not one of auto, cpu, cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UlsamUsageError("device 'cuda' was asked for, and CUDA is not available here")
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def env_world_size() -> int:
    """The world size torchrun announced, 1 without torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (if any) and settle this process's device."""
    world = env_world_size()
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, target, backend)


def shutdown(context: DistContext) -> None:
    """Leave the process group this module joined."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The sum of ``tensor`` over all processes (``tensor`` itself when alone)."""
    if not context.distributed:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` on every process."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch of all processes, on any device the process group serves.

    In training mode the per-channel mean and variance are all-reduced (with
    ``torch.distributed.nn.functional.all_reduce``, so gradients flow across processes as
    with ``SyncBatchNorm``); running statistics are updated from the global statistics.
    Outside training, or alone, it is a plain ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device, dtype=torch.float64)
        total = all_reduce(torch.cat([x.sum(dims).double(), count]))
        n = total[-1]
        mean = total[:-1] / n
        centered = x.double() - mean.view(1, -1, 1, 1)
        var = all_reduce((centered * centered).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else float(self.momentum)
                )
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.to(x.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(x.dtype), alpha=momentum)
        out = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms of ``model`` synchronised across processes; ULSAM blocks take their plain path.

    CUDA: ``torch.nn.SyncBatchNorm``. CPU: :class:`GlooSyncBatchNorm` (2-D BatchNorms;
    others are refused). Parameter and buffer names are unchanged.
    """
    from ulsam_inject.block.module import ULSAM

    for module in model.modules():
        if isinstance(module, ULSAM):
            # The fused training path computes statistics itself; the plain path calls the
            # BatchNorm modules, which are the synchronised ones.
            module.forward = module.forward_plain  # type: ignore[method-assign]
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, GlooSyncBatchNorm):
            if type(child) is not nn.BatchNorm2d:
                raise UlsamUsageError(
                    f"sync-bn on the CPU handles plain BatchNorm2d layers only; {name} is a "
                    f"{type(child).__name__}"
                )
            replacement = GlooSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            replacement.to(next(child.buffers(), torch.empty(0)).device)
            setattr(module, name, replacement)
        else:
            _convert_cpu(child)
    return module
