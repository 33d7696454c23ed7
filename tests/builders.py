"""Compact CNNs built from block specs, with the stages they should have.

``build(net)`` returns a ``CompactNet``: a stem conv, ``features`` (the blocks; with
``nested``, one ``Sequential`` per group of blocks, the way timm and torchvision lay out
their stages), and a pooling + linear head. ``expected_stages(net)`` says what
``find_stages`` should report for it. Blocks come in three styles:

- ``module``: a block module (optionally with squeeze-excitation and a residual add),
- ``sequential``: a plain ``nn.Sequential`` of the block's layers,
- ``flat``: the layers laid directly into the enclosing ``Sequential``, no block module;
- ``split``: two sibling ``Sequential``s, depthwise conv-norm-act then pointwise
  conv-norm-act (MobileOne's layout), no module enclosing the pair.

The hypothesis strategy ``nets`` draws random ``NetSpec``s.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

INPUT_SIZE = (3, 32, 32)
STEM_CHANNELS = 8
STEM_STRIDE = 2


@dataclass(frozen=True)
class BlockSpec:
    """One block: depthwise-separable ("dws") or inverted residual ("ir")."""

    kind: str
    out_channels: int
    stride: int = 1
    expand: int = 1
    multiplier: int = 1
    residual: bool = False
    se: bool = False
    style: str = "module"

    def layers(self, in_channels: int) -> list[nn.Module]:
        """The block's layers in order (without squeeze-excitation and residual add)."""
        layers: list[nn.Module] = []
        width = in_channels
        if self.kind == "ir" and self.expand > 1:
            width = in_channels * self.expand
            layers += [nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)]
            layers.append(nn.ReLU6())
        dw_out = width * self.multiplier
        layers += [
            nn.Conv2d(width, dw_out, 3, self.stride, 1, groups=width, bias=False),
            nn.BatchNorm2d(dw_out),
            nn.ReLU6() if self.kind == "ir" else nn.ReLU(),
            nn.Conv2d(dw_out, self.out_channels, 1, bias=False),
            nn.BatchNorm2d(self.out_channels),
        ]
        if self.kind == "dws":
            layers.append(nn.ReLU())
        return layers

    def has_residual(self, in_channels: int) -> bool:
        return self.residual and self.stride == 1 and in_channels == self.out_channels


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(1, channels // 4), 1)
        self.expand = nn.Conv2d(max(1, channels // 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(scale))))


class Block(nn.Module):
    """A block module: ``self.conv`` holds the layers; optional SE and identity shortcut."""

    def __init__(self, spec: BlockSpec, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*spec.layers(in_channels))
        self.se = SqueezeExcite(spec.out_channels) if spec.se else nn.Identity()
        self.use_residual = spec.has_residual(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.conv(x))
        if self.use_residual:
            out = out + x
        return out


@dataclass(frozen=True)
class NetSpec:
    """Groups of blocks; ``nested`` puts each group in its own ``Sequential``."""

    groups: tuple[tuple[BlockSpec, ...], ...]
    nested: bool = False

    @property
    def blocks(self) -> list[BlockSpec]:
        return [block for group in self.groups for block in group]


def _block_layers(spec: BlockSpec, in_channels: int) -> list[nn.Module]:
    """What a block adds to its container: its layers (flat) or one module."""
    if spec.style == "flat":
        return spec.layers(in_channels)
    if spec.style == "sequential":
        return [nn.Sequential(*spec.layers(in_channels))]
    if spec.style == "split":
        layers = spec.layers(in_channels)
        return [nn.Sequential(*layers[:3]), nn.Sequential(*layers[3:])]
    return [Block(spec, in_channels)]


class CompactNet(nn.Module):
    def __init__(self, net: NetSpec, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, STEM_STRIDE, 1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(),
        )
        channels = STEM_CHANNELS
        features: list[nn.Module] = []
        for group in net.groups:
            layers: list[nn.Module] = []
            for spec in group:
                layers += _block_layers(spec, channels)
                channels = spec.out_channels
            if net.nested:
                features.append(nn.Sequential(*layers))
            else:
                features += layers
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return self.classifier(self.pool(x).flatten(1))


def build(net: NetSpec) -> CompactNet:
    return CompactNet(net)


@dataclass(frozen=True)
class ExpectedStage:
    name: str
    kind: str
    in_channels: int
    out_channels: int
    stride: int
    height: int
    residual: bool
    replaceable: bool


def expected_stages(net: NetSpec) -> list[ExpectedStage]:
    """The stages ``find_stages`` should report for ``build(net)``, in order.

    A block module or ``Sequential`` is named by its path; a flat block after its first
    and last layers (``features.3-8``: the depthwise conv to the last norm/activation),
    a split one after its two modules (``features.3-4``), unless it is alone in its
    container, which then encloses exactly the pair and names it.
    """
    containers: list[tuple[str, list[BlockSpec]]]
    if net.nested:
        containers = [(f"features.{i}", list(group)) for i, group in enumerate(net.groups)]
    else:
        containers = [("features", net.blocks)]
    result = []
    channels = STEM_CHANNELS
    size = INPUT_SIZE[1] // STEM_STRIDE
    for container, blocks in containers:
        position = 0
        for spec in blocks:
            count = len(_block_layers(spec, channels))
            if spec.style in ("flat", "split") and len(blocks) == 1:
                name = container
            elif spec.style in ("flat", "split"):
                name = f"{container}.{position}-{position + count - 1}"
            else:
                name = f"{container}.{position}"
            out_size = -(-size // spec.stride)
            inverted = spec.kind == "ir" and spec.expand > 1
            result.append(
                ExpectedStage(
                    name=name,
                    kind="inverted-residual" if inverted else "depthwise-separable",
                    in_channels=channels,
                    out_channels=spec.out_channels,
                    stride=spec.stride,
                    height=out_size,
                    residual=spec.style == "module" and spec.has_residual(channels),
                    replaceable=spec.stride == 1 and channels == spec.out_channels,
                )
            )
            channels, size, position = spec.out_channels, out_size, position + count
    return result


@st.composite
def block_specs(draw: st.DrawFn, in_channels: int, downsample_ok: bool) -> BlockSpec:
    kind = draw(st.sampled_from(["dws", "ir"]))
    out_channels = in_channels if draw(st.booleans()) else draw(st.integers(3, 24))
    stride = draw(st.sampled_from([1, 2])) if downsample_ok else 1
    residual = draw(st.booleans())
    # A residual add or SE needs a module; a flat layout is for plain dw-pw pairs.
    styles = ["module", "sequential"] + (["flat", "split"] if kind == "dws" else [])
    style = draw(st.sampled_from(styles))
    return BlockSpec(
        kind=kind,
        out_channels=out_channels,
        stride=stride,
        expand=draw(st.sampled_from([1, 2, 4])) if kind == "ir" else 1,
        multiplier=draw(st.sampled_from([1, 1, 2])) if kind == "dws" else 1,
        residual=residual and style == "module",
        se=style == "module" and draw(st.booleans()),
        style=style,
    )


@st.composite
def nets(draw: st.DrawFn, max_blocks: int = 6) -> NetSpec:
    """1..max_blocks random blocks in 1..3 groups; at most 3 downsample (maps >= 2x2)."""
    count = draw(st.integers(1, max_blocks))
    blocks: list[BlockSpec] = []
    channels, downsamples = STEM_CHANNELS, 0
    for _ in range(count):
        spec = draw(block_specs(channels, downsample_ok=downsamples < 3))
        blocks.append(spec)
        channels = spec.out_channels
        downsamples += spec.stride == 2
    cuts = sorted(set(draw(st.lists(st.integers(1, count - 1), max_size=2)))) if count > 1 else []
    bounds = [0, *cuts, count]
    groups = tuple(tuple(blocks[a:b]) for a, b in itertools.pairwise(bounds))
    return NetSpec(groups=groups, nested=draw(st.booleans()))
