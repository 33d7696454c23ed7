"""The cost rules, one op at a time, against hand counts and torch's FlopCounterMode."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ulsam_inject import ULSAM
from ulsam_inject.cost.rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    NoRule,
    adaptive_window_elements,
    einsum_macs,
    method_rule,
    module_rule,
    nbytes,
    numel,
    register,
    ulsam_rule,
)


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def flop_counter_macs(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops() // 2


def run_module_rule(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        output = module.eval()(*inputs)
    rule = module_rule(module)
    assert rule is not None
    return rule(None, inputs, output, module)


# -- convolution and linear -----------------------------------------------------------


def test_conv_hand_count() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert run_module_rule(conv, torch.randn(1, 8, 5, 5)) == (25 * 16 * 8 * 9, 25 * 16)


def test_depthwise_conv_without_bias() -> None:
    conv = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
    # 32 channels x 7 x 7 outputs, 9 MACs each
    assert run_module_rule(conv, torch.randn(2, 32, 14, 14)) == (2 * 32 * 49 * 9, 0)


@settings(max_examples=40, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 4]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    size=st.integers(5, 8),
    transposed=st.booleans(),
)
def test_conv_rule_matches_flop_counter(
    dims: int,
    groups: int,
    per_group_in: int,
    per_group_out: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    size: int,
    transposed: bool,
) -> None:
    kind = f"ConvTranspose{dims}d" if transposed else f"Conv{dims}d"
    conv = getattr(nn, kind)(
        groups * per_group_in,
        groups * per_group_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    x = torch.randn(1, groups * per_group_in, *([size] * dims))
    macs, other = run_module_rule(conv, x)
    assert macs == flop_counter_macs(conv, x)
    assert other == numel(conv(x))  # the bias add


def test_functional_conv_reads_weight_and_bias_from_inputs() -> None:
    x, weight, bias = meta(1, 4, 6, 6), meta(8, 2, 3, 3), meta(8)
    out = F.conv2d(x, weight, bias, groups=2)
    rule = FUNCTION_RULES[F.conv2d]
    assert rule(None, (x, weight, bias, 1, 0, 1, 2), out, None) == (8 * 16 * 2 * 9, 8 * 16)
    assert rule(None, (x, weight), out, None)[1] == 0


def test_conv_subclass_inherits_rule() -> None:
    class MyConv(nn.Conv2d):
        pass

    assert module_rule(MyConv(1, 1, 1)) is MODULE_RULES[nn.Conv2d]
    assert module_rule(nn.Module()) is None


def test_linear_on_tokens() -> None:
    linear = nn.Linear(16, 32)
    x = torch.randn(2, 5, 16)
    assert run_module_rule(linear, x) == (2 * 5 * 32 * 16, 2 * 5 * 32)
    assert FUNCTION_RULES[F.linear](None, (x, linear.weight), linear(x), None) == (
        2 * 5 * 32 * 16,
        0,
    )


# -- matrix products ------------------------------------------------------------------

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2)


@settings(max_examples=40, deadline=None)
@given(batch_a=shapes, m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5))
def test_matmul_rule_matches_flop_counter(batch_a: list[int], m: int, k: int, n: int) -> None:
    a, b = torch.randn(*batch_a, m, k), torch.randn(k, n)
    out = torch.matmul(a, b)
    macs, _ = FUNCTION_RULES[torch.matmul](None, (a, b), out, None)
    assert macs == m * k * n * numel(torch.empty(batch_a)) == flop_counter_macs(torch.matmul, a, b)


def test_bmm_method_and_operator() -> None:
    a, b = meta(3, 4, 5), meta(3, 5, 6)
    out = a @ b
    assert METHOD_RULES["bmm"](None, (a, b), out, None) == (3 * 4 * 5 * 6, 0)
    assert FUNCTION_RULES[operator.matmul](None, (a, b), out, None) == (3 * 4 * 5 * 6, 0)


def test_addmm_counts_the_add() -> None:
    c, a, b = meta(4, 6), meta(4, 5), meta(5, 6)
    assert FUNCTION_RULES[torch.addmm](None, (c, a, b), meta(4, 6), None) == (120, 24)


def test_einsum_contractions() -> None:
    q, k = meta(2, 3, 7, 8), meta(2, 3, 9, 8)
    assert einsum_macs("bhid,bhjd->bhij", [q, k]) == 2 * 3 * 7 * 9 * 8
    assert einsum_macs("B H I D, B H J D -> B H I J", [q, k]) == 2 * 3 * 7 * 9 * 8
    assert einsum_macs("...id,...jd->...ij", [q, k]) == 2 * 3 * 7 * 9 * 8
    real_q, real_k = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 9, 8)
    expected = flop_counter_macs(torch.einsum, "bhid,bhjd->bhij", real_q, real_k)
    assert expected == einsum_macs("bhid,bhjd->bhij", [q, k])
    with pytest.raises(NoRule, match="einsum with 3 operands"):
        einsum_macs("ij,jk,kl->il", [meta(2, 2)] * 3)


def test_scaled_dot_product_attention() -> None:
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 4)
    out = F.scaled_dot_product_attention(q, k, v)
    macs, other = FUNCTION_RULES[F.scaled_dot_product_attention](None, (q, k, v), out, None)
    assert macs == flop_counter_macs(F.scaled_dot_product_attention, q, k, v)
    assert other == 5 * 2 * 5 * 6


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_flop_counter(batch_first: bool) -> None:
    attention = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        output = attention(x, x, x, need_weights=False)
    macs, other = MODULE_RULES[nn.MultiheadAttention](None, (x, x, x), output, attention)
    # need_weights=True takes the path of explicit matmuls, which the counter sees; the
    # fused CPU attention kernel has no FLOP formula in some torch versions (counted 0).
    with FlopCounterMode(display=False) as counter:
        attention(x, x, x, need_weights=True)
    assert macs == counter.get_total_flops() // 2
    assert other > 0


# -- other ops ------------------------------------------------------------------------


def test_elementwise_and_activation_rules() -> None:
    x = meta(2, 3, 4)
    for rule in (
        FUNCTION_RULES[operator.add],
        FUNCTION_RULES[torch.relu],
        FUNCTION_RULES[F.hardswish],
        METHOD_RULES["sigmoid"],
        MODULE_RULES[nn.SiLU],
    ):
        assert rule(None, (x,), x, None) == (0, 24)
    assert FUNCTION_RULES[torch.addcmul](None, (x, x, x), x, None) == (0, 48)


def test_in_place_method_uses_out_of_place_rule() -> None:
    assert method_rule("add_") is METHOD_RULES["add"]
    assert method_rule("no_such_method") is None


def test_softmax_norms_and_reductions() -> None:
    x = meta(2, 8, 5, 5)
    assert METHOD_RULES["softmax"](None, (x, -1), x, None) == (0, 3 * 400)
    bn = nn.BatchNorm2d(8)
    assert MODULE_RULES[nn.BatchNorm2d](None, (x,), x, bn) == (0, 2 * 400)
    ln = nn.LayerNorm(5)
    assert MODULE_RULES[nn.LayerNorm](None, (x,), x, ln) == (0, 7 * 400)
    no_affine = nn.GroupNorm(2, 8, affine=False)
    assert module_rule(no_affine)(None, (x,), x, no_affine) == (0, 5 * 400)  # type: ignore[misc]
    assert METHOD_RULES["mean"](None, (x, (2, 3)), meta(2, 8), None) == (0, 400)


def test_pooling_rules() -> None:
    x = meta(1, 4, 8, 8)
    out = meta(1, 4, 4, 4)
    pool = nn.MaxPool2d(3, 2, 1)
    assert MODULE_RULES[nn.MaxPool2d](None, (x,), out, pool) == (0, 8 * 64)
    assert MODULE_RULES[nn.AvgPool2d](None, (x,), out, nn.AvgPool2d(2)) == (0, 4 * 64)
    assert FUNCTION_RULES[F.max_pool2d](None, (x, 3, 1, 1), x, None) == (0, 8 * 256)
    assert FUNCTION_RULES[F.adaptive_avg_pool2d](None, (x, 1), meta(1, 4, 1, 1), None) == (0, 256)
    global_max = nn.AdaptiveMaxPool2d(1)
    assert module_rule(global_max)(None, (x,), meta(1, 4, 1, 1), global_max) == (0, 252)  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 24), m=st.integers(1, 24))
def test_adaptive_windows_match_torch(n: int, m: int) -> None:
    # Pool one-hot inputs: input j lies in as many windows as outputs it reaches.
    eye = torch.eye(n).unsqueeze(1)  # n planes of length n
    reached = (F.adaptive_max_pool1d(eye, m) > 0).sum().item()
    assert adaptive_window_elements((n,), (m,)) == reached


@pytest.mark.parametrize(("mode", "per_output"), [("nearest", 0), ("bilinear", 9), ("bicubic", 31)])
def test_interpolation(mode: str, per_output: int) -> None:
    x, out = meta(1, 2, 4, 4), meta(1, 2, 8, 8)
    rule = FUNCTION_RULES[F.interpolate]
    assert rule(None, (x, None, 2.0, mode), out, None) == (0, per_output * 128)
    upsample = nn.Upsample(scale_factor=2, mode=mode)
    assert MODULE_RULES[nn.Upsample](None, (x,), out, upsample) == (0, per_output * 128)


def test_views_and_dropout_cost_nothing() -> None:
    x = meta(2, 3)
    for rule in (METHOD_RULES["view"], FUNCTION_RULES[torch.flatten], MODULE_RULES[nn.Dropout]):
        assert rule(None, (x,), x, None) == (0, 0)


def test_ulsam_rule_is_exact() -> None:
    channels, groups, h, w = 32, 4, 7, 9
    block = ULSAM(channels, groups)
    x = meta(2, channels, h, w)
    macs, other = ulsam_rule(None, (x,), x, block)
    assert macs == 2 * 2 * channels * h * w
    assert other == 2 * h * w * (14 * channels + 7 * groups)
    assert module_rule(block) is ulsam_rule


def test_ulsam_macs_match_its_convolutions() -> None:
    """The rule's MACs are those of the block's two convs, run as convs."""
    block = ULSAM(16, 4).train()  # training mode runs the pointwise conv as a conv
    x = torch.randn(1, 16, 6, 6)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block.pw(block.dw(x))
    assert ulsam_rule(None, (x,), x, block)[0] == counter.get_total_flops() // 2


def test_register_and_sizes() -> None:
    @register("frobnicate")
    def rule(node, inputs, output, module):  # type: ignore[no-untyped-def]
        return 1, 2

    try:
        assert method_rule("frobnicate_") is rule
    finally:
        del METHOD_RULES["frobnicate"]
    assert nbytes((meta(2, 3), meta(4, dtype=torch.float16), 5)) == 24 + 8
