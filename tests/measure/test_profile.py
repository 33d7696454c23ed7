"""node_latencies: per-node seconds of a graph module, for shares of the run time."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from ulsam_inject import ULSAM
from ulsam_inject.errors import UlsamUsageError
from ulsam_inject.measure.profile import node_latencies

SIZE = (3, 16, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


class Counter(nn.Module):
    """Counts its calls and whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return x


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.counter = Counter()
        self.attend = ULSAM(8, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.attend(self.counter(y)) + 1


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (Counter, ULSAM)) or super().is_leaf_module(m, module_qualified_name)


def traced() -> fx.GraphModule:
    torch.manual_seed(0)
    model = Tiny()
    return fx.GraphModule(model, LeafTracer().trace(model))


def test_every_node_gets_a_time() -> None:
    graph_module = traced()
    (seconds,) = node_latencies([graph_module], SIZE, repeats=3)
    assert list(seconds) == [n.name for n in graph_module.graph.nodes]
    assert all(v >= 0 for v in seconds.values())
    # The nodes that compute take time; the placeholder and output take next to none.
    for name in ("conv", "attend"):
        assert seconds[name] > seconds["x"] and seconds[name] > seconds["output"]


@pytest.mark.parametrize(("warmup", "repeats"), [(0, 1), (2, 3)])
def test_warmup_and_repeats_run_the_graph(warmup: int, repeats: int) -> None:
    graph_module = traced()
    node_latencies([graph_module], SIZE, repeats=repeats, warmup=warmup)
    counter = graph_module.get_submodule("counter")
    assert counter.calls == warmup + repeats
    assert counter.modes == [False] * (warmup + repeats)  # eval mode


def test_batch_is_configurable() -> None:
    shapes: list[tuple[int, ...]] = []
    graph_module = traced()
    graph_module.get_submodule("counter").register_forward_hook(
        lambda m, i, o: shapes.append(tuple(i[0].shape))
    )
    node_latencies([graph_module], SIZE, batch=3, repeats=1, warmup=0)
    assert shapes == [(3, 8, 16, 16)]


def test_models_and_random_state_are_not_changed() -> None:
    graph_module = traced().train()
    state = {k: v.clone() for k, v in graph_module.state_dict().items()}
    rng = torch.get_rng_state()
    node_latencies([graph_module], SIZE, repeats=2)
    assert all(m.training for m in graph_module.modules())
    for key, value in graph_module.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_several_modules_are_interleaved() -> None:
    a, b = traced(), traced()
    order: list[str] = []
    for label, module in (("a", a), ("b", b)):
        module.get_submodule("counter").register_forward_hook(
            lambda m, i, o, label=label: order.append(label)
        )
    first, second = node_latencies([a, b], SIZE, repeats=3, warmup=1)
    assert "".join(order) == "ab" + "ba" + "ab" + "ba"
    assert set(first) == set(second) == {n.name for n in a.graph.nodes}


@pytest.mark.parametrize("statistic", ["median", "min"])
def test_statistics(statistic: str) -> None:
    (seconds,) = node_latencies([traced()], SIZE, repeats=3, statistic=statistic)  # type: ignore[arg-type]
    assert seconds["attend"] > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"repeats": 0}, {"batch": 0}, {"warmup": -1}, {"statistic": "mean"}],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(UlsamUsageError, match=r"must be >= 1|statistic must be one of"):
        node_latencies([traced()], SIZE, **kwargs)  # type: ignore[arg-type]
