"""Stage discovery on known models, hand-written models and random compact CNNs."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import INPUT_SIZE, BlockSpec, NetSpec, build, expected_stages, nets
from hypothesis import HealthCheck, given, settings
from torch import nn

from ulsam_inject import Stage, find_stages, inject, trace_model
from ulsam_inject.graph.tree import is_anchor_conv, is_pointwise_conv

SMALL = (3, 64, 64)


def _summary(stages: list[Stage]) -> list[tuple[object, ...]]:
    return [
        (s.name, s.kind, s.in_channels, s.out_channels, s.stride, s.height, s.residual)
        for s in stages
    ]


def test_mobilenet_v2_inverted_residuals(tv_model):
    stages = find_stages(tv_model("mobilenet_v2"))
    assert [s.name for s in stages] == [f"features.{i}" for i in range(1, 18)]
    assert [s.index for s in stages] == list(range(17))
    widths = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    assert [s.out_channels for s in stages] == widths
    assert [s.in_channels for s in stages] == [32, *widths[:-1]]
    assert [s.stride for s in stages] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    residual = [s.name for s in stages if s.residual]
    assert residual == [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]
    # Replaceable exactly where the shape is kept, which here is where the residual is.
    assert [s.name for s in stages if s.replaceable] == residual
    assert stages[0].kind == "depthwise-separable"  # t=1: no expansion conv
    assert {s.kind for s in stages[1:]} == {"inverted-residual"}
    assert (stages[-1].height, stages[-1].width) == (7, 7)
    assert (stages[0].height, stages[0].width) == (112, 112)


def test_shufflenet_units_including_downsampling_ones(tv_model):
    stages = find_stages(tv_model("shufflenet_v2_x0_5"), SMALL)
    names = [f"stage2.{i}" for i in range(4)]
    names += [f"stage3.{i}" for i in range(8)] + [f"stage4.{i}" for i in range(4)]
    assert [s.name for s in stages] == names
    assert {s.kind for s in stages} == {"shuffle-unit"}
    down = [s for s in stages if s.stride == 2]
    # The unit with two depthwise branches is one stage, not two.
    assert [(s.name, s.in_channels, s.out_channels) for s in down] == [
        ("stage2.0", 24, 48),
        ("stage3.0", 48, 96),
        ("stage4.0", 96, 192),
    ]
    assert all(s.replaceable for s in stages if s.stride == 1)


def test_mnasnet_flat_stem_is_named_after_its_nodes(tv_model):
    stages = find_stages(tv_model("mnasnet0_5"), SMALL)
    first = stages[0]
    assert (first.name, first.kind, first.in_channels, first.out_channels) == (
        "layers.3-7",
        "depthwise-separable",
        16,
        8,
    )
    assert [s.name for s in stages[1:4]] == ["layers.8.0", "layers.8.1", "layers.8.2"]
    assert stages[-1].name == "layers.13.0"
    assert len(stages) == 17


def test_mobilenet_v3_and_efficientnet_blocks(tv_model):
    small = find_stages(tv_model("mobilenet_v3_small"), SMALL)
    assert [s.name for s in small] == [f"features.{i}" for i in range(1, 12)]
    effnet = find_stages(tv_model("efficientnet_b0"), SMALL)
    assert len(effnet) == 16
    assert [s.name for s in effnet[:4]] == [
        "features.1.0",
        "features.2.0",
        "features.2.1",
        "features.3.0",
    ]
    assert effnet[-1].name == "features.7.0"
    assert [s.residual for s in effnet[:3]] == [False, False, True]


def test_regnet_grouped_blocks(tv_model):
    stages = find_stages(tv_model("regnet_x_400mf"), SMALL)
    assert len(stages) == 22
    assert stages[0].name == "trunk_output.block1.block1-0"
    assert stages[-1].name == "trunk_output.block4.block4-11"
    assert {s.kind for s in stages} == {"grouped-conv-block"}


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """The classic hand-written PyTorch MobileNetV1 (width 1/4 to keep the test small)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        cfg = [(8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2)]
        cfg += [(128, 128, 1)] * 5 + [(128, 256, 2), (256, 256, 1)]
        self.model = nn.Sequential(
            conv_bn(3, 8, 2), *(conv_dw(i, o, s) for i, o, s in cfg), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.model(x).view(-1, 256))


def test_hand_written_mobilenet_v1_has_one_stage_per_dw_block():
    stages = find_stages(MobileNetV1(), SMALL)
    assert [s.name for s in stages] == [f"model.{i}" for i in range(1, 14)]
    assert {s.kind for s in stages} == {"depthwise-separable"}
    assert [s.stride for s in stages][:4] == [1, 2, 1, 2]
    assert [(s.in_channels, s.out_channels) for s in stages[:2]] == [(8, 16), (16, 32)]
    assert stages[-1].height == 2


def test_flat_sequential_pairs_end_before_the_head():
    model = nn.Sequential(
        *conv_bn(3, 8, 2),
        *conv_dw(8, 16, 1),
        *conv_dw(16, 32, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    stages = find_stages(model, (3, 32, 32))
    assert [(s.name, s.in_channels, s.out_channels, s.stride, s.height) for s in stages] == [
        ("3-8", 8, 16, 1, 16),
        ("9-14", 16, 32, 2, 8),
    ]


def test_sibling_depthwise_and_pointwise_modules_pair_up():
    def unit(conv: nn.Conv2d) -> nn.Sequential:
        return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU())

    body = nn.Sequential(
        unit(nn.Conv2d(8, 8, 3, 2, 1, groups=8)),
        unit(nn.Conv2d(8, 16, 1)),
        unit(nn.Conv2d(16, 16, 3, 1, 1, groups=16)),
        unit(nn.Conv2d(16, 16, 1)),
    )
    model = nn.Sequential(conv_bn(3, 8, 1), body)
    stages = find_stages(model, (3, 16, 16))
    assert [(s.name, s.in_channels, s.out_channels, s.stride) for s in stages] == [
        ("1.0-1", 8, 16, 2),
        ("1.2-3", 16, 16, 1),
    ]
    assert stages[1].replaceable and not stages[0].replaceable


def test_depth_multiplier_and_conv_subclasses_count_as_depthwise():
    class MyConv(nn.Conv2d):
        pass

    assert is_anchor_conv(nn.Conv2d(8, 16, 3, groups=8))  # depth multiplier 2
    assert is_anchor_conv(MyConv(8, 8, 5, groups=8))
    assert is_anchor_conv(nn.Conv2d(8, 8, 1, groups=8))  # a 1x1 depthwise conv
    assert not is_anchor_conv(nn.Conv2d(8, 8, 3))
    assert not is_anchor_conv(nn.Conv2d(8, 8, 1, groups=2))  # grouped 1x1: neither
    assert not is_pointwise_conv(nn.Conv2d(8, 8, 1, groups=2))
    assert is_pointwise_conv(MyConv(8, 4, 1))
    assert not is_pointwise_conv(nn.Conv2d(8, 4, 3))

    model = nn.Sequential(
        conv_bn(3, 8, 1),
        nn.Sequential(MyConv(8, 16, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(16, 12, 1)),
    )
    (stage,) = find_stages(model, (3, 8, 8))
    assert (stage.name, stage.in_channels, stage.out_channels) == ("1", 8, 12)


def test_model_without_depthwise_convs_has_no_stages():
    model = nn.Sequential(conv_bn(3, 8, 2), conv_bn(8, 8, 1))
    assert find_stages(model, (3, 16, 16)) == []


def test_stage_to_dict_has_exactly_the_public_fields(tv_model):
    stage = find_stages(tv_model("mobilenet_v2"), SMALL)[2]
    assert stage.to_dict() == {
        "index": 2,
        "name": "features.3",
        "kind": "inverted-residual",
        "in_channels": 24,
        "out_channels": 24,
        "stride": 1,
        "height": 16,
        "width": 16,
        "residual": True,
        "replaceable": True,
    }


def test_non_square_input_gives_height_and_width(tv_model):
    stages = find_stages(tv_model("mobilenet_v2"), (3, 64, 96))
    assert (stages[-1].height, stages[-1].width) == (2, 3)


def test_find_stages_accepts_a_traced_model_and_leaves_the_model_alone(tv_model):
    model = tv_model("mobilenet_v3_small").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    from_model = find_stages(model, SMALL)
    from_traced = find_stages(trace_model(model, SMALL))
    assert from_model == from_traced
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_a_retrofitted_model_has_the_same_stages(tv_model, name):
    model = tv_model(name)
    result = inject(model, at="all", input_size=SMALL, report=False)
    again = find_stages(result.model, SMALL)
    assert _summary(again) == _summary(list(result.stages))
    # Also after a round trip through a copy (its graph and node records are copied).
    assert _summary(find_stages(copy.deepcopy(result.model), SMALL)) == _summary(again)


def test_untraceable_block_is_still_one_stage():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = conv_dw(8, 16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x) if x.sum() != 0 else self.block(-x)

    model = nn.Sequential(conv_bn(3, 8, 1), Untraceable(), conv_dw(16, 16, 1))
    traced = trace_model(model, (3, 8, 8))
    assert list(traced.leaves) == ["1"]
    stages = find_stages(traced)
    assert [(s.name, s.in_channels, s.out_channels) for s in stages] == [
        ("1", 8, 16),
        ("2", 16, 16),
    ]


def test_builder_expectations_on_a_fixed_net():
    net = NetSpec(
        groups=(
            (BlockSpec("dws", 16, style="flat"), BlockSpec("ir", 16, expand=4, residual=True)),
            (BlockSpec("dws", 24, stride=2, style="split", multiplier=2),),
            (BlockSpec("ir", 24, se=True, residual=True), BlockSpec("dws", 32, style="sequential")),
        ),
        nested=True,
    )
    stages = find_stages(build(net), INPUT_SIZE)
    assert [s.name for s in stages] == [
        "features.0.0-5",
        "features.0.6",
        "features.1",
        "features.2.0",
        "features.2.1",
    ]
    assert [s.residual for s in stages] == [False, True, False, True, False]


@pytest.mark.slow  # 40 random networks, each built and traced
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nets())
def test_random_compact_cnns_have_the_stages_they_were_built_with(net):
    found = find_stages(build(net), INPUT_SIZE)
    expected = expected_stages(net)
    assert [
        (s.name, s.kind, s.in_channels, s.out_channels, s.stride, s.height, s.width) for s in found
    ] == [
        (e.name, e.kind, e.in_channels, e.out_channels, e.stride, e.height, e.height)
        for e in expected
    ]
    assert [(s.residual, s.replaceable) for s in found] == [
        (e.residual, e.replaceable) for e in expected
    ]
    assert [s.index for s in found] == list(range(len(expected)))


@pytest.mark.parametrize(
    ("name", "count", "first", "last"),
    [
        ("mobilenetv3_small_050", 11, "blocks.0.0", "blocks.4.2"),
        ("lcnet_050", 13, "blocks.0.0", "blocks.5.1"),
        ("mobileone_s0", 21, "stages.0.0-1", "stages.3"),
    ],
)
def test_timm_blocks(timm_model, name, count, first, last):
    stages = find_stages(timm_model(name), SMALL)
    assert (len(stages), stages[0].name, stages[-1].name) == (count, first, last)
