"""count(): totals against torchvision's published figures, ULSAM, unknown ops, no side effects."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from ulsam_inject import ULSAM, find_stages, trace_model
from ulsam_inject.cost.count import Cost, Totals, count
from ulsam_inject.errors import InputSizeError, UlsamUsageError

SPREAD = [
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "shufflenet_v2_x1_0",
    "mnasnet1_0",
    "efficientnet_b0",
    "regnet_y_400mf",
    "regnet_x_400mf",
    "resnet18",
    "squeezenet1_0",
    "googlenet",  # has submodules made leaves by the tracer: they are opened and priced
]


def build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's init-weights notice
        return torchvision.models.get_model(name)


def published(name: str) -> tuple[float, int]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return weights.meta["_ops"], weights.transforms().crop_size[0]


@pytest.mark.parametrize("name", SPREAD)
def test_macs_match_torchvision_published_gflops(name: str) -> None:
    model = build(name)
    gmacs, size = published(name)
    cost = count(model, (3, size, size))
    assert round(cost.macs / 1e9, 3) == gmacs
    assert cost.flops == 2 * cost.macs
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.params == cost.trainable_params
    assert cost.buffers == sum(b.numel() for b in model.buffers())
    assert cost.uncounted == () and cost.uncounted_macs == ()
    assert cost.other_ops > 0 and cost.bytes_read > 0 and cost.bytes_written > 0


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2_x1_0", "mnasnet1_0"])
def test_macs_equal_flop_counter_mode(name: str) -> None:
    model = build(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 160, 160))
    assert count(model, (3, 160, 160)).macs == counter.get_total_flops() // 2


def test_mobilenet_v2_reference_point() -> None:
    cost = count(build("mobilenet_v2"))
    assert round(cost.macs / 1e9, 3) == 0.301
    assert cost.input_size == (3, 224, 224)


# -- ULSAM -------------------------------------------------------------------------------


def ulsam_node(cost: Cost):  # type: ignore[no-untyped-def]
    (node,) = [n for n in cost.per_node if n.target == "ULSAM"]
    return node


@pytest.mark.parametrize(("channels", "groups", "size"), [(16, 4, 8), (32, 1, 5), (24, 8, 7)])
def test_ulsam_leaf_cost_is_exact(channels: int, groups: int, size: int) -> None:
    model = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), ULSAM(channels, groups))
    cost = count(model, (3, size, size))
    node = ulsam_node(cost)
    hw = size * size
    assert node.macs == 2 * channels * hw
    assert node.params == 5 * channels + 3 * groups
    assert node.other_ops == hw * (14 * channels + 7 * groups)
    assert node.bytes_read == node.bytes_written == 4 * channels * hw
    assert node.module == "1" and node.op == "call_module"
    assert cost.macs == hw * channels * 27 + 2 * channels * hw
    assert cost.for_module("1").macs == 2 * channels * hw


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.attention = ULSAM(16, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class UlsamLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ULSAM) or super().is_leaf_module(m, module_qualified_name)


def test_graph_module_with_ulsam_counts_like_the_module() -> None:
    model = Small().eval()
    graph_module = fx.GraphModule(model, UlsamLeafTracer().trace(model))
    assert any(n.target == "attention" for n in graph_module.graph.nodes)
    from_module = count(model, (3, 32, 32))
    from_graph = count(graph_module, (3, 32, 32))
    assert from_graph.totals() == from_module.totals()
    node = ulsam_node(from_graph)
    assert node.macs == 2 * 16 * 16 * 16
    assert node.params == 5 * 16 + 3 * 4


def test_replacing_a_stage_shows_in_the_delta() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    swapped = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ULSAM(8, 2))
    delta = count(swapped, (3, 10, 10)).totals() - count(model, (3, 10, 10)).totals()
    assert delta.macs == 2 * 8 * 100 - 100 * 8 * 8 * 9
    assert delta.params == (5 * 8 + 3 * 2) - (8 * 8 * 9 + 8)


# -- reuse of a trace, input sizes ------------------------------------------------------


def test_traced_input_reuses_the_graph() -> None:
    model = build("mobilenet_v3_small")
    traced = trace_model(model, (3, 96, 96))
    from_traced = count(traced)
    assert from_traced.input_size == (3, 96, 96)
    assert from_traced.totals() == count(model, (3, 96, 96)).totals()
    assert [n.name for n in from_traced.per_node] == [
        n.name for n in traced.graph_module.graph.nodes
    ]
    with pytest.raises(InputSizeError, match="differs from the traced"):
        count(traced, (3, 64, 64))


def test_traced_without_shapes_gets_them() -> None:
    traced = trace_model(Small(), (3, 32, 32), propagate=False)
    assert count(traced).macs == count(Small(), (3, 32, 32)).macs


@pytest.mark.parametrize("size", [(3, 224), (0, 5, 5), "3x224x224"])
def test_bad_input_size(size: object) -> None:
    with pytest.raises(InputSizeError, match=r"input size must be \(channels, height, width\)"):
        count(Small(), size)  # type: ignore[arg-type]


# -- stages and sums ---------------------------------------------------------------------


def test_stage_sums() -> None:
    model = build("mobilenet_v2")
    traced = trace_model(model, (3, 128, 128))
    cost = count(traced)
    stages = find_stages(traced)
    parts = [cost.for_nodes(stage.nodes) for stage in stages]
    assert all(part.macs > 0 and part.params > 0 for part in parts)
    assert sum(part.macs for part in parts) < cost.macs
    everything = cost.for_nodes(n.name for n in cost.per_node)
    assert everything.macs == cost.macs and everything.other_ops == cost.other_ops
    assert everything.params == cost.params
    assert everything.bytes == cost.bytes
    first = stages[0]
    expected = sum(p.numel() for m in first.modules for p in model.get_submodule(m).parameters())
    assert parts[0].params == expected
    assert cost.for_module(first.name).macs == parts[0].macs
    with pytest.raises(UlsamUsageError, match="no node named"):
        cost.for_nodes(["not_a_node"])


def test_totals_arithmetic() -> None:
    a = Totals(1, 2, 3, 4, 5, ("x",))
    b = Totals(10, 20, 30, 40, 50, ("y", "x"))
    assert a + b == Totals(11, 22, 33, 44, 55, ("x", "y"))
    assert (b - a).macs == 18 and (b - a).flops == 36 and b.bytes == 90


# -- unknown ops -------------------------------------------------------------------------


@fx.wrap
def scaled_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b).cumsum(0)


class Untraceable(nn.Module):
    """Branches on a value: cannot be traced, nor run on meta tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weird = Untraceable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.logcumsumexp(x, dim=1)
        z = scaled_mm(y.flatten(1), torch.ones(12, 5))
        return self.weird(z)


def test_unknown_ops_are_listed_never_zeroed() -> None:
    cost = count(Odd(), (3, 2, 2))
    assert "torch.logcumsumexp" in cost.uncounted
    wrapped = next(n for n in cost.uncounted if n.endswith("scaled_mm"))
    assert "Untraceable" in cost.uncounted
    assert cost.uncounted_macs == ("Untraceable",)
    # the wrapped function's matrix product is still found (FlopCounterMode on meta)
    node = next(n for n in cost.per_node if n.target == wrapped)
    assert node.macs == 12 * 5 and node.uncounted == (wrapped,)


class ModeDependent(nn.Module):
    """Made a leaf by the tracer (its code depends on self.training); takes Python flags."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(
        self, x: torch.Tensor, twice: bool = False, extra: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.training:
            x = x * 1.5
        y = self.conv(x)
        if twice:
            y = self.conv(y)
        if extra is not None:
            y = y + extra
        return torch.relu(y)


class ShapeDependent(nn.Module):
    """Branches on a shape: untraceable symbolically, traceable with concrete shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            x = nn.functional.pad(x, (0, 4 - x.shape[-1] % 4, 0, 0))
        return self.conv(x)


class WithLeaves(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = ModeDependent()
        self.b = ModeDependent()
        self.c = ShapeDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.a(x, True, x) + self.b(x)
        return self.c(x)


def test_leaves_are_opened_and_priced_op_by_op() -> None:
    model = WithLeaves()
    traced = trace_model(model, (3, 6, 6))
    assert set(traced.leaves) == {"a", "b", "c"}
    cost = count(traced)
    nodes = {n.module: n for n in cost.per_node if n.module}
    outputs = 36 * 4
    assert nodes["a"].macs == 2 * outputs * 4 * 9  # twice=True: the conv runs twice
    assert nodes["a"].other_ops == outputs * 4  # 2 biases, the extra add, relu
    assert nodes["b"].macs == outputs * 4 * 9 and nodes["b"].other_ops == 2 * outputs
    assert nodes["c"].macs == 6 * 4 * 4 * 4 * 9  # padded to 6 x 8, a valid 3x3 conv
    assert cost.uncounted == ()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(1, 3, 6, 6))
    assert cost.macs == counter.get_total_flops() // 2


# -- bytes -------------------------------------------------------------------------------


class Elementwise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        return (y * x).view(-1)


@pytest.mark.parametrize(("dtype", "width"), [(torch.float32, 4), (torch.float64, 8)])
def test_bytes_of_elementwise_ops(dtype: torch.dtype, width: int) -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), Elementwise()).to(dtype)
    cost = count(model, (2, 4, 4))
    elements = 2 * 4 * 4
    by_target = {n.target: n for n in cost.per_node}
    relu, mul, view = by_target["torch.relu"], by_target["operator.mul"], by_target["Tensor.view"]
    assert (relu.bytes_read, relu.bytes_written) == (width * elements, width * elements)
    assert (mul.bytes_read, mul.bytes_written) == (2 * width * elements, width * elements)
    assert (view.bytes_read, view.bytes_written) == (0, 0)
    assert (relu.other_ops, mul.other_ops) == (elements, elements)


@settings(max_examples=12, deadline=None)
@given(
    channels=st.lists(st.sampled_from([4, 8, 12]), min_size=1, max_size=3),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    depthwise=st.booleans(),
    size=st.integers(8, 16),
)
def test_random_cnn_matches_flop_counter(
    channels: list[int], kernel: int, stride: int, depthwise: bool, size: int
) -> None:
    layers: list[nn.Module] = []
    width = 3
    for out in channels:
        layers += [
            nn.Conv2d(width, out, kernel, stride, kernel // 2),
            nn.BatchNorm2d(out),
            nn.ReLU6(),
        ]
        if depthwise:
            layers += [nn.Conv2d(out, out, 3, 1, 1, groups=out), nn.Hardswish()]
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 7)]
    model = nn.Sequential(*layers).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        output = model(torch.randn(1, 3, size, size))
    cost = count(model, (3, size, size))
    assert cost.macs == counter.get_total_flops() // 2
    assert cost.uncounted == ()
    assert cost.per_node[-2].bytes_written == output.numel() * 4  # the head's output


# -- no side effects ---------------------------------------------------------------------


def test_counting_leaves_the_model_unchanged() -> None:
    model = build("googlenet")  # has leaves that are opened (traced again) by count
    model.train()
    model.inception4b.eval()  # mixed flags must survive
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    count(model, (3, 64, 64))
    count(trace_model(model, (3, 64, 64)))
    assert {name: m.training for name, m in model.named_modules()} == flags
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    assert all(p.device.type == "cpu" for p in model.parameters())
