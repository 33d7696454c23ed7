"""The ULSAM block, vectorized over all subspaces, and conversion from the reference layout."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BlockConfigError

DEFAULT_MOMENTUM = 0.1
"""BatchNorm momentum of a new block, in PyTorch's convention (weight of the newest batch).

The reference code uses 0.9, which in PyTorch's convention makes the running statistics
almost exactly the last batch's: a TensorFlow-convention value carried over. New blocks use
PyTorch's default; blocks converted from reference weights keep 0.9 unless told otherwise.
"""

REFERENCE_MOMENTUM = 0.9

_REFERENCE_KEY = re.compile(r"^subspaces\.(\d+)\.(conv_dws|bn_dws|conv_point|bn_point)\.(\w+)$")


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending: the valid group counts for ``n`` channels."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(channels: int, groups: int, where: str = "") -> None:
    """Raise :class:`BlockConfigError` unless ``groups`` is a positive divisor of ``channels``."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise BlockConfigError(f"channels must be a positive integer, got {channels!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or channels % groups:
        place = f" at {where}" if where else ""
        raise BlockConfigError(
            f"groups={groups!r} does not divide channels={channels}{place}; "
            f"valid groups: {', '.join(map(str, divisors(channels)))}"
        )


def _separable_max_3x3(x: torch.Tensor) -> torch.Tensor:
    """Max over each 3x3 window, as a max of shifted slices along W and then along H.

    Windows are clipped at the border, exactly what padding with -inf gives. Writes into
    fresh buffers with ``out=``, so it is for tensors that need no gradient.
    """
    rows = x.clone()
    torch.maximum(rows[..., 1:], x[..., :-1], out=rows[..., 1:])
    torch.maximum(rows[..., :-1], x[..., 1:], out=rows[..., :-1])
    out = rows.clone()
    torch.maximum(out[..., 1:, :], rows[..., :-1, :], out=out[..., 1:, :])
    torch.maximum(out[..., :-1, :], rows[..., 1:, :], out=out[..., :-1, :])
    return out


def max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """Same values as ``F.max_pool2d(x, 3, stride=1, padding=1)``, faster on NCHW CPU tensors.

    PyTorch's CPU pooling kernel is about 10x slower on contiguous NCHW tensors than on
    channels_last ones. Without autograd, separable maxima are used; with autograd, the
    native kernel on a channels_last copy (so the backward gets the fast kernel too and
    the gradient goes to the same element as the native op's).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1)
    if x.is_contiguous():
        return _separable_max_3x3(x)
    return F.max_pool2d(x, 3, 1, 1)


def _fold_bn(
    weight: torch.Tensor, bias: torch.Tensor, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's weight and bias."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), shift


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
        momentum: BatchNorm momentum in PyTorch's convention. Defaults to PyTorch's 0.1;
            the reference code's 0.9 is kept by :meth:`from_reference_state_dict`.
        eps: BatchNorm epsilon.

    Parameters: 5C + 3g (conv weights 2C, conv biases C + g, BN affine 2C + 2g).
    MACs: 2*C*H*W (depthwise and grouped pointwise 1x1 convs), independent of g.

    In eval mode the BatchNorms are folded into the convs on the fly; the result is the
    same computation (tested against the per-subspace reference). For the fastest CPU run,
    wrap the block or the whole model in ``torch.compile``.

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
    ) -> None:
        super().__init__()
        check_groups(channels, groups)
        self.channels = channels
        self.groups = groups
        self.dw = nn.Conv2d(channels, channels, kernel_size=1, groups=channels, bias=True)
        self.dw_bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum)
        self.pw = nn.Conv2d(channels, groups, kernel_size=1, groups=groups, bias=True)
        self.pw_bn = nn.BatchNorm2d(groups, eps=eps, momentum=momentum)

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

    def _attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-softmax map, (B, g, H, W)."""
        c = self.channels
        if self.training or self.dw_bn.running_mean is None:
            # A 1x1 depthwise conv is a per-channel scale and shift: one elementwise pass,
            # with a far cheaper backward than the convolution kernel's.
            dw = torch.addcmul(
                self._bias(self.dw).view(1, c, 1, 1), x, self.dw.weight.view(1, c, 1, 1)
            )
            pooled = max_pool_3x3(F.relu(self.dw_bn(dw)))
            return F.relu(self.pw_bn(self.pw(pooled)))
        # Eval: each conv + BN is one affine map, so fold them (one pass, not three), and run
        # the grouped pointwise conv as a batched matrix product (far faster than the conv).
        dw_scale, dw_shift = _fold_bn(self.dw.weight.view(-1), self._bias(self.dw), self.dw_bn)
        dw = torch.addcmul(dw_shift.view(1, c, 1, 1), x, dw_scale.view(1, c, 1, 1)).relu_()
        pooled = max_pool_3x3(dw)
        b, _, h, w = x.shape
        g = self.groups
        pw_weight, pw_bias = _fold_bn(self.pw.weight, self._bias(self.pw), self.pw_bn)
        logits = torch.matmul(pw_weight.view(g, 1, c // g), pooled.reshape(b, g, c // g, h * w))
        return logits.add_(pw_bias.view(g, 1, 1)).relu_().view(b, g, h, w)

    @staticmethod
    def _bias(conv: nn.Conv2d) -> torch.Tensor:
        if conv.bias is not None:
            return conv.bias
        return conv.weight.new_zeros(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, c, h, w = x.shape
        g = self.groups
        logits = self._attention_logits(x)
        attention = torch.softmax(logits.reshape(b, g, 1, h * w), dim=-1)
        grouped = x.reshape(b, g, c // g, h * w)
        # x + x * A in one pass; A broadcasts over the channels of its subspace.
        return torch.addcmul(grouped, grouped, attention).view(b, c, h, w)

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
            >>> from ulsam_inject.reference import ReferenceULSAM
            >>> ref = ReferenceULSAM(32, groups=4)
            >>> ULSAM.from_reference_state_dict(ref.state_dict())
            ULSAM(
              channels=32, groups=4
              ...
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
                rows = slice(n, n + 1) if key.startswith("pw") else slice(n * width, (n + 1) * width)
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
            >>> from ulsam_inject.reference import ReferenceULSAM
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
