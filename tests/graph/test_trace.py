"""Tracing: leaf fallback, train/eval-consistent graphs, shape propagation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ulsam_inject.errors import InputSizeError, ShapeError, TraceError, UlsamUsageError
from ulsam_inject.graph.shapes import node_shape
from ulsam_inject.graph.trace import trace_model


class DataDependent(nn.Module):
    """Control flow on tensor values: symbolic tracing cannot go through it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(x) * 2


class Wrapper(nn.Module):
    """Traceable itself; holds an untraceable child."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inner = DataDependent(channels)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.inner(x))


class TrainOnly(nn.Module):
    """Code that branches on ``self.training``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return x * 2
        return x + 1


class DropoutFn(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=self.training)


class Net(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.middle = middle
        self.head = nn.Conv2d(8, 4, 1)
        self.unused = nn.Linear(2, 2)  # never called: its state must survive tracing
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.conv(x))) * self.scale


def test_traceable_model_has_no_leaves_and_same_outputs(tv_model):
    model = tv_model("mobilenet_v2")
    traced = trace_model(model, (3, 64, 64))
    assert traced.leaves == {}
    assert traced.shape_method == "meta"
    assert traced.input_size == (3, 64, 64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(traced.graph_module(x), model(x))


def test_nodes_carry_scopes_and_meta_shapes(tv_model):
    traced = trace_model(tv_model("mobilenet_v2"), (3, 64, 64))
    nodes = {n.name: n for n in traced.graph_module.graph.nodes}
    dw = next(n for n in nodes.values() if n.target == "features.2.conv.1.0")
    assert dw.meta["scope"][:3] == ("features", "features.2", "features.2.conv")
    assert dw.meta["value"].device.type == "meta"
    assert node_shape(dw) == (1, 96, 16, 16)
    output = next(n for n in nodes.values() if n.op == "output")
    assert node_shape(output) == (1, 1000)


def test_untraceable_submodule_becomes_a_leaf_and_the_rest_is_traced():
    model = Net(Wrapper(8)).eval()
    traced = trace_model(model, (3, 16, 16))
    # The innermost module whose code failed is the leaf; its parent is still traced.
    assert list(traced.leaves) == ["middle.inner"]
    assert "control flow" in traced.leaves["middle.inner"]
    targets = [n.target for n in traced.graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "middle.inner", "middle.norm", "head"]
    assert traced.leaf_containing("middle.inner.conv") == "middle.inner"
    assert traced.leaf_containing("middle.inner") == "middle.inner"
    assert traced.leaf_containing("middle.norm") is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(traced.graph_module(x), model(x))
        assert torch.equal(traced.graph_module(-x.abs() - 5), model(-x.abs() - 5))


def test_state_dict_keys_survive_tracing_including_unused_modules():
    model = Net(Wrapper(8))
    traced = trace_model(model, (3, 16, 16))
    assert list(traced.graph_module.state_dict()) == list(model.state_dict())


def test_untraceable_root_forward_is_a_trace_error():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.mean() > 0 else x

    with pytest.raises(TraceError, match=r"cannot trace Root.*own forward"):
        trace_model(Root(), (3, 8, 8))


def test_training_dependent_module_becomes_a_leaf_that_follows_the_mode():
    model = Net(TrainOnly())
    traced = trace_model(model, (3, 8, 8))
    assert traced.leaves == {"middle": "its code depends on self.training"}
    gm = traced.graph_module
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        for mode in (True, False):
            model.train(mode)
            gm.train(mode)
            assert torch.equal(gm(x), model(x))


def test_training_argument_reads_the_graph_modules_flag():
    model = Net(DropoutFn())
    traced = trace_model(model, (3, 8, 8))
    assert traced.leaves == {}  # one graph serves both modes: the flag is read at run time
    gm = traced.graph_module
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model.eval()
        gm.eval()
        assert torch.equal(gm(x), model(x))
        gm.train()
        torch.manual_seed(1)
        dropped = gm(x)
        torch.manual_seed(1)
        assert torch.equal(dropped, model.train()(x))
        assert not torch.equal(dropped, model.eval()(x))


def test_tracing_leaves_the_model_unmodified():
    model = Net(Wrapper(8))
    model.train()
    model.middle.eval()  # mixed flags must come back as they were
    flags = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace_model(model, (3, 16, 16))
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_shapes_fall_back_to_a_real_run_when_values_are_needed():
    class NeedsValues(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.abs().max().item() >= 0:  # a Python number from the data
                return x[:, :2]
            return x

    model = Net(nn.Sequential(NeedsValues(), nn.Conv2d(2, 8, 1))).eval()
    traced = trace_model(model, (3, 8, 8))
    assert traced.shape_method in ("fake", "real")
    assert "middle.0" in traced.leaves
    leaf = next(n for n in traced.graph_module.graph.nodes if n.target == "middle.0")
    assert node_shape(leaf) == (1, 2, 8, 8)


@pytest.mark.parametrize(
    "size", [(3, 224), (3, 0, 224), (3, 224.0, 224), "3x224x224", (True, 8, 8)]
)
def test_malformed_input_size_is_a_usage_error(size):
    with pytest.raises(InputSizeError, match="channels, height, width") as info:
        trace_model(nn.Conv2d(3, 3, 1), size)
    assert isinstance(info.value, UlsamUsageError)
    assert isinstance(info.value, ValueError)


def test_input_sizes_the_model_cannot_take_are_input_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 7), nn.ReLU())
    with pytest.raises(InputSizeError, match=r"1x3x4x4.*it runs at 224x224: is 4x4 too small"):
        trace_model(model, (3, 4, 4))
    with pytest.raises(
        InputSizeError, match=r"first convolution takes 3 channels, the input size gives 1"
    ):
        trace_model(model, (1, 64, 64))


def test_a_model_that_fails_at_a_plausible_size_is_a_shape_error():
    class Picky(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(1, 3, 100, 100)  # only one input size works

    with pytest.raises(ShapeError, match=r"could not run the traced model on a 1x3x64x64"):
        trace_model(Picky(), (3, 64, 64))


def test_graph_never_imports_the_block() -> None:
    # The layer below surgery knows no block type: leaf types come in as an argument.
    import pathlib

    import ulsam_inject.graph

    folder = pathlib.Path(ulsam_inject.graph.__file__).parent
    for path in folder.glob("*.py"):
        text = path.read_text()
        assert "ulsam_inject.block" not in text, path.name
        assert "from ulsam_inject import" not in text, path.name
