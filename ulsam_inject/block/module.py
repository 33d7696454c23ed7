"""The ULSAM block, vectorized over all subspaces, and conversion from the reference layout.

One module; every call computes the same thing (all paths are tested against the
per-subspace reference in :mod:`ulsam_inject.block.reference` and against
:meth:`ULSAM.forward_plain`). :func:`ulsam_inject.block.dispatch.choose_path` picks how:

- **plain** (the rule): the module-by-module computation. Correct on every device and dtype
  PyTorch's layers support, inside ``torch.autocast``, and what torch.fx, torch.compile,
  torch.export, jit tracing and dispatch modes such as ``FlopCounterMode`` see;
- **cpu-streaming** (eval, no gradient, CPU float32): :mod:`ulsam_inject.block.inference`,
  folded BatchNorms and a cache-sized streaming pass;
- **cpu-training** (training or gradients, CPU float32): :mod:`ulsam_inject.block.training`,
  one autograd function with a hand-written backward;
- **cuda-fused** (eval, no gradient, CUDA, Triton available): :mod:`ulsam_inject.block.gpu`,
  the attention logits in one Triton kernel over folded BatchNorms, then two ops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ulsam_inject.block.dispatch import BlockPath, choose_path
from ulsam_inject.block.gpu import gpu_inference_forward
from ulsam_inject.block.inference import fold_sources, folded, inference_forward
from ulsam_inject.block.training import NormSpec, TrainingPass, uses_batch_stats
from ulsam_inject.errors import BlockConfigError, InitError

DEFAULT_MOMENTUM = 0.1
"""BatchNorm momentum of a new block, in PyTorch's convention (weight of the newest batch).

The reference code uses 0.9, which in PyTorch's convention makes the running statistics
almost exactly the last batch's: a TensorFlow-convention value carried over. New blocks use
PyTorch's default; blocks converted from reference weights keep 0.9 unless told otherwise.
"""

REFERENCE_MOMENTUM = 0.9
"""BatchNorm momentum of the reference code, kept by :meth:`ULSAM.from_reference_state_dict`."""

MAX_CHANNELS = 1 << 20
"""The most channels a block accepts: far beyond any CNN, small enough that listing the
valid group counts in an error message stays instant."""

INITS = ("default", "uniform")
"""How a new block can start (see :func:`check_init` and the ``init`` argument of :class:`ULSAM`).

- ``"default"``: PyTorch's initialization of every layer (the reference code's);
- ``"uniform"``: the attention map starts flat, ``A = 1/(H*W)`` at every position, so the
  block starts as ``x * (1 + 1/(H*W))``: the pointwise BatchNorm's weight is 0 and its bias 1,
  so the logits are the constant 1 in train and eval mode, and ReLU still passes gradient.
"""

DEFAULT_INIT = "default"
"""The init of a new block unless told otherwise (figures: benchmarks/init_drift.py)."""

_REFERENCE_KEY = re.compile(r"^subspaces\.(\d+)\.(conv_dws|bn_dws|conv_point|bn_point)\.(\w+)$")


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending: the valid group counts for ``n`` channels.

    Example:
        >>> divisors(12)
        [1, 2, 3, 4, 6, 12]
    """
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_groups(channels: int, groups: int, where: str = "") -> None:
    """Raise :class:`BlockConfigError` unless ``groups`` is a positive divisor of ``channels``.

    Example:
        >>> check_groups(96, 5)
        Traceback (most recent call last):
        ...
        ulsam_inject.errors.BlockConfigError: groups=5 does not divide channels=96; valid ...
    """
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise BlockConfigError(f"channels must be a positive integer, got {channels!r}")
    if channels > MAX_CHANNELS:
        raise BlockConfigError(
            f"channels={channels} is beyond any feature map ULSAM is meant for "
            f"(at most {MAX_CHANNELS})"
        )
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or channels % groups:
        place = f" at {where}" if where else ""
        raise BlockConfigError(
            f"groups={groups!r} does not divide channels={channels}{place}; "
            f"valid groups: {', '.join(map(str, divisors(channels)))}"
        )


def check_init(init: object) -> str:
    """``init`` if it is one of :data:`INITS`; else :class:`~ulsam_inject.errors.InitError`.

    Example:
        >>> check_init("uniform")
        'uniform'
        >>> check_init("zeros")
        Traceback (most recent call last):
        ...
        ulsam_inject.errors.InitError: init 'zeros' is not one of: default, uniform
    """
    if not isinstance(init, str) or init not in INITS:
        shown = repr(init) if isinstance(init, str) else f"{init!r} ({type(init).__name__})"
        raise InitError(f"init {shown[:80]} is not one of: {', '.join(INITS)}")
    return init


class ULSAM(nn.Module):
    """Ultra-Lightweight Subspace Attention (Saini et al., WACV 2020), vectorized.

    Splits the ``channels`` into ``groups`` equal subspaces (in order, as ``torch.chunk``)
    and, for each, computes one spatial attention map ``A = softmax_HW(ReLU(BN(PW(
    maxpool3x3(ReLU(BN(DW(x))))))))``; the output is ``x + A * x``, the same shape as ``x``.
    All subspaces run in one pass: the g depthwise convs are one depthwise conv over all
    channels, the g pointwise convs are one grouped conv ``channels -> groups``.

    Args:
        channels: input (and output) channels C.
        groups: number of subspaces g; must divide ``channels``.
        momentum: BatchNorm momentum in PyTorch's convention (weight of the newest batch).
            Defaults to PyTorch's 0.1 (:data:`DEFAULT_MOMENTUM`); the reference code's 0.9
            is kept by :meth:`from_reference_state_dict`.
        eps: BatchNorm epsilon.
        init: how the block starts, one of :data:`INITS`: ``"default"`` (PyTorch's
            initialization) or ``"uniform"`` (a flat attention map: the block starts as
            ``x * (1 + 1/(H*W))``; see :meth:`start_uniform`).

    Parameters: 5C + 3g (conv weights 2C, conv biases C + g, BN affine 2C + 2g).
    MACs: 2*C*H*W (depthwise and grouped pointwise 1x1 convs), independent of g.

    It computes what the per-subspace reference computes, in train mode (batch statistics,
    running statistics updated the same way) and eval mode, forward and backward; see the
    module docstring for the fast paths. On the CPU the default (eager) mode is the fastest
    (``torch.compile(block)`` runs the plain computation through inductor: about as fast at
    batch 32, slower at batch 1; see benchmarks/bench_block.py). Double backward is not
    supported in eager mode.

    Example:
        >>> import torch
        >>> from ulsam_inject import ULSAM
        >>> block = ULSAM(64, groups=4).eval()
        >>> block(torch.randn(1, 64, 14, 14)).shape
        torch.Size([1, 64, 14, 14])
    """

    def __init__(
        self,
        channels: int,
        groups: int = 4,
        *,
        momentum: float = DEFAULT_MOMENTUM,
        eps: float = 1e-5,
        init: str = DEFAULT_INIT,
    ) -> None:
        super().__init__()
        check_init(init)
        check_groups(channels, groups)
        self.channels = channels
        self.groups = groups
        self.dw = nn.Conv2d(channels, channels, kernel_size=1, groups=channels, bias=True)
        self.dw_bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.pw = nn.Conv2d(channels, groups, kernel_size=1, groups=groups, bias=True)
        self.pw_bn = nn.BatchNorm2d(groups, eps=eps, momentum=momentum)
        # Where inject put the block (the stage's name) and whether it replaced the stage:
        # what :func:`ulsam_inject.save` reads to write a rebuildable recipe from a bare
        # model. None for a block built by hand.
        self.placed_at: str | None = None
        self.replaces_stage = False
        if init == "uniform":
            self.start_uniform()

    @torch.no_grad()
    def start_uniform(self) -> ULSAM:
        """Make the attention map flat: ``A = 1/(H*W)`` everywhere, in train and eval mode.

        The pointwise BatchNorm's weight becomes 0 and its bias 1, so the logits are the
        constant 1 whatever the input and the block computes ``x * (1 + 1/(H*W))``. No
        choice of the block's parameters gives ``x`` itself (``A`` is a softmax: it sums to
        1 over H*W), and a flat map is the smallest ``A`` can be at every position. The
        logits are 1 rather than 0 so that ReLU passes gradient, and the conv weights stay
        random so the BatchNorm weight gets gradient: the block can still learn. Returns
        the block.
        """
        self.pw_bn.weight.zero_()
        self.pw_bn.bias.fill_(1.0)
        return self

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise BlockConfigError(
                f"ULSAM expects a 4-D (batch, channels, height, width) input, "
                f"got {x.dim()}-D shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.channels:
            raise BlockConfigError(
                f"ULSAM was built for {self.channels} channels, got an input with "
                f"{x.shape[1]} channels (shape {tuple(x.shape)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy):
            return self.forward_plain(x)
        self._check_input(x)
        sources = fold_sources(self)
        path = choose_path(self, x, sources)
        if path is BlockPath.CPU_STREAMING:
            return inference_forward(x, folded(self, sources))
        if path is BlockPath.CUDA_FUSED:
            return gpu_inference_forward(x, folded(self, sources))
        if path is BlockPath.CPU_TRAINING:
            return self._forward_autograd(x)
        return self.forward_plain(x)

    # -- the plain computation ------------------------------------------------------------

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The computation op by op, with the submodules themselves: what tracers should see.

        Same result as :meth:`forward` (up to float rounding), but slower in eager mode.
        """
        dw = F.relu(self.dw_bn(self.dw(x)))
        logits = F.relu(self.pw_bn(self.pw(F.max_pool2d(dw, 3, 1, 1))))
        attention = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        x5 = x.unflatten(1, (self.groups, self.channels // self.groups))
        return torch.addcmul(x5, x5, attention.unsqueeze(2)).flatten(1, 2)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The block's ``g`` attention maps for ``x``: ``(batch, g, H, W)``, softmaxes over H*W.

        Subspace ``n`` (channels ``n*C/g`` to ``(n+1)*C/g``) is scaled by ``1 + maps[:, n]``;
        computed with the plain ops, as :meth:`forward_plain` does.

        Example:
            >>> maps = ULSAM(8, groups=2).eval().attention_maps(torch.randn(1, 8, 5, 5)).detach()
            >>> tuple(maps.shape), round(float(maps[0, 1].sum()), 4)
            ((1, 2, 5, 5), 1.0)
        """
        self._check_input(x)
        dw = F.relu(self.dw_bn(self.dw(x)))
        logits = F.relu(self.pw_bn(self.pw(F.max_pool2d(dw, 3, 1, 1))))
        return torch.softmax(logits.flatten(2), dim=-1).view_as(logits)

    # -- eager, with autograd or batch statistics ------------------------------------------

    def _forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dw_bn, pw_bn = self.dw_bn, self.pw_bn
        if (uses_batch_stats(dw_bn) or uses_batch_stats(pw_bn)) and b * h * w < 2:
            raise BlockConfigError(
                "ULSAM with BatchNorm on batch statistics (training mode) needs more than one "
                f"value per channel (batch * height * width > 1), got input shape {tuple(x.shape)}"
            )
        out: torch.Tensor = TrainingPass.apply(
            x,
            self.dw.weight,
            self.dw.bias,
            dw_bn.weight,
            dw_bn.bias,
            self.pw.weight,
            self.pw.bias,
            pw_bn.weight,
            pw_bn.bias,
            NormSpec.of(dw_bn),
            NormSpec.of(pw_bn),
        )
        return out

    # -- weights in the reference code's layout ------------------------------------------

    @classmethod
    def from_reference_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        momentum: float = REFERENCE_MOMENTUM,
        eps: float = 1e-5,
    ) -> ULSAM:
        """Build a block from a state dict in the reference layout (``subspaces.{n}.*``).

        Channels and groups are inferred; the reference's BatchNorm momentum (0.9) is kept
        unless ``momentum`` says otherwise, so training continues exactly as it would there.

        Example:
            >>> from ulsam_inject.block.reference import ReferenceULSAM
            >>> ref = ReferenceULSAM(32, groups=4)
            >>> block = ULSAM.from_reference_state_dict(ref.state_dict())
            >>> block.channels, block.groups, block.dw_bn.momentum
            (32, 4, 0.9)
        """
        by_subspace: dict[int, dict[str, torch.Tensor]] = {}
        unexpected = []
        for key, value in state_dict.items():
            match = _REFERENCE_KEY.match(key)
            if match is None:
                unexpected.append(key)
                continue
            n, module, leaf = match.groups()
            by_subspace.setdefault(int(n), {})[f"{module}.{leaf}"] = value
        if unexpected:
            raise BlockConfigError(
                f"not a reference ULSAM state dict: {len(unexpected)} unexpected keys, e.g. "
                f"{', '.join(unexpected[:3])}; expected 'subspaces.{{n}}.conv_dws.weight' etc."
            )
        groups = len(by_subspace)
        if groups == 0 or sorted(by_subspace) != list(range(groups)):
            raise BlockConfigError(
                f"reference state dict must hold subspaces 0..g-1, found {sorted(by_subspace)}"
            )
        first = by_subspace[0].get("conv_dws.weight")
        if first is None:
            raise BlockConfigError("reference state dict has no 'subspaces.0.conv_dws.weight'")
        width = first.shape[0]
        block = cls(width * groups, groups, momentum=momentum, eps=eps)
        if first.is_floating_point():
            block = block.to(device=first.device, dtype=first.dtype)
        target = block.state_dict()
        expected = {
            "conv_dws.weight": ("dw.weight", (width, 1, 1, 1)),
            "conv_dws.bias": ("dw.bias", (width,)),
            "conv_point.weight": ("pw.weight", (1, width, 1, 1)),
            "conv_point.bias": ("pw.bias", (1,)),
        }
        for stat in ("weight", "bias", "running_mean", "running_var"):
            expected[f"bn_dws.{stat}"] = (f"dw_bn.{stat}", (width,))
            expected[f"bn_point.{stat}"] = (f"pw_bn.{stat}", (1,))
        for n in range(groups):
            sub = by_subspace[n]
            missing = sorted(set(expected) - set(sub))
            if missing:
                raise BlockConfigError(
                    f"reference state dict is missing subspaces.{n}.{missing[0]} "
                    f"({len(missing)} keys missing in subspace {n})"
                )
            for ref_key, (key, shape) in expected.items():
                value = sub[ref_key]
                if tuple(value.shape) != shape:
                    raise BlockConfigError(
                        f"subspaces.{n}.{ref_key} has shape {tuple(value.shape)}, expected {shape}"
                    )
                rows = (
                    slice(n, n + 1) if key.startswith("pw") else slice(n * width, (n + 1) * width)
                )
                target[key][rows] = value.reshape(target[key][rows].shape)
        for bn, ref_bn in (("dw_bn", "bn_dws"), ("pw_bn", "bn_point")):
            counts = [
                int(by_subspace[n][f"{ref_bn}.num_batches_tracked"])
                for n in range(groups)
                if f"{ref_bn}.num_batches_tracked" in by_subspace[n]
            ]
            if counts:
                target[f"{bn}.num_batches_tracked"].fill_(max(counts))
        block.load_state_dict(target)
        return block

    def to_reference_state_dict(self) -> dict[str, torch.Tensor]:
        """This block's weights in the reference layout, loadable by the reference code.

        Example:
            >>> from ulsam_inject.block.reference import ReferenceULSAM
            >>> ref = ReferenceULSAM(32, groups=4)
            >>> ref.load_state_dict(ULSAM(32, groups=4).to_reference_state_dict())
            <All keys matched successfully>
        """
        own = {k: v.detach().clone() for k, v in self.state_dict().items()}
        width = self.channels // self.groups
        out: dict[str, torch.Tensor] = {}
        for n in range(self.groups):
            chan = slice(n * width, (n + 1) * width)
            one = slice(n, n + 1)
            prefix = f"subspaces.{n}."
            out[prefix + "conv_dws.weight"] = own["dw.weight"][chan].clone()
            out[prefix + "conv_dws.bias"] = own["dw.bias"][chan].clone()
            out[prefix + "conv_point.weight"] = own["pw.weight"][one].reshape(1, width, 1, 1)
            out[prefix + "conv_point.bias"] = own["pw.bias"][one].clone()
            for stat in ("weight", "bias", "running_mean", "running_var"):
                out[prefix + f"bn_dws.{stat}"] = own[f"dw_bn.{stat}"][chan].clone()
                out[prefix + f"bn_point.{stat}"] = own[f"pw_bn.{stat}"][one].clone()
            out[prefix + "bn_dws.num_batches_tracked"] = own["dw_bn.num_batches_tracked"].clone()
            out[prefix + "bn_point.num_batches_tracked"] = own["pw_bn.num_batches_tracked"].clone()
        return out
