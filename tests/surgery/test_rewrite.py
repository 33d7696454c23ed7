"""Graph surgery: where the new nodes go, what replace removes, identity blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ulsam_inject import ULSAM, find_stages, inject, make_plan, trace_model
from ulsam_inject.errors import PositionError, TraceError
from ulsam_inject.surgery.rewrite import identity_blocks, rewrite

SMALL = (3, 64, 64)


def _surgery(model, at, **kwargs):
    traced = trace_model(copy.deepcopy(model), SMALL)
    stages = {s.name: s for s in find_stages(traced)}
    plan = make_plan(list(stages.values()), at, traced=traced, **kwargs)
    return rewrite(traced, plan), stages


def test_after_puts_the_block_between_the_stage_output_and_all_its_users(tv_model):
    model = tv_model("mobilenet_v2")
    gm, stages = _surgery(model, "features.13")
    nodes = {n.name: n for n in gm.graph.nodes}
    sink = nodes[stages["features.13"].output_node]
    (block,) = sink.users  # the stage's output now feeds the block only
    assert (block.op, block.target) == ("call_module", "ulsam.features_13")
    assert block.args == (sink,)
    # features.14 (no residual) reads the block's output.
    assert {u.meta["scope"][1] for u in block.users if u.op == "call_module"} == {"features.14"}
    assert isinstance(gm.get_submodule("ulsam.features_13"), ULSAM)
    assert gm.ulsam.features_13.channels == 96
    gm.graph.lint()


def test_after_on_a_residual_stage_goes_after_the_add(tv_model):
    gm, stages = _surgery(tv_model("mobilenet_v2"), "features.16")
    nodes = {n.name: n for n in gm.graph.nodes}
    sink = nodes[stages["features.16"].output_node]
    assert sink.op == "call_function" and "add" in str(sink.target)
    assert [u.target for u in sink.users] == ["ulsam.features_16"]


def test_after_on_a_shuffle_unit_goes_after_the_channel_shuffle(tv_model):
    gm, stages = _surgery(tv_model("shufflenet_v2_x0_5"), "stage2.1")
    nodes = {n.name: n for n in gm.graph.nodes}
    sink = nodes[stages["stage2.1"].output_node]
    # channel_shuffle ends in a view: the block sees the shuffled tensor.
    chain = [sink]
    while len(chain[-1].args) and isinstance(chain[-1].args[0], torch.fx.Node):
        if chain[-1].op == "call_function" and "cat" in str(chain[-1].target):
            break
        chain.append(chain[-1].args[0])
    assert any("transpose" in str(n.target) for n in chain)
    assert [u.target for u in sink.users] == ["ulsam.stage2_1"]


def test_replace_removes_the_stage_and_feeds_its_input_to_the_block(tv_model):
    model = tv_model("mobilenet_v2")
    gm, stages = _surgery(model, "features.13", mode="replace")
    stage = stages["features.13"]
    names = {n.name for n in gm.graph.nodes}
    assert not names & set(stage.nodes)
    assert not any(k.startswith("features.13.") for k in gm.state_dict())
    with pytest.raises(AttributeError, match="has no attribute `13`"):
        gm.get_submodule("features.13")
    (block,) = [n for n in gm.graph.nodes if n.target == "ulsam.features_13"]
    assert block.args[0].name == stage.input_node


def test_replace_with_identity_blocks_is_skipping_the_stage(tv_model):
    model = tv_model("mobilenet_v2")
    gm, _ = _surgery(model, ["features.12", "features.13", "features.16"], mode="replace")
    identity_blocks(gm)
    skipped = copy.deepcopy(model)
    for i in (12, 13, 16):
        skipped.features[i] = nn.Identity()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), skipped(x))


def test_after_and_replace_at_adjacent_stages(tv_model):
    model = tv_model("mobilenet_v2")
    gm, _ = _surgery(
        model,
        ["features.12", "features.13", "features.15", "features.16"],
        mode={"features.13": "replace", "features.15": "replace"},
    )
    blocks = [n.target for n in gm.graph.nodes if n.op == "call_module" and "ulsam" in n.target]
    assert blocks == [
        "ulsam.features_12",
        "ulsam.features_13",
        "ulsam.features_15",
        "ulsam.features_16",
    ]
    identity_blocks(gm)
    skipped = copy.deepcopy(model)
    skipped.features[13] = nn.Identity()
    skipped.features[15] = nn.Identity()
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), skipped(x))


def test_identity_blocks_swaps_every_block_in_place(tv_model):
    gm, _ = _surgery(tv_model("mobilenet_v2"), "all")
    assert sum(isinstance(m, ULSAM) for m in gm.modules()) == 17
    same = identity_blocks(gm)
    assert same is gm
    assert not any(isinstance(m, ULSAM) for m in gm.modules())
    assert isinstance(gm.get_submodule("ulsam.features_1"), nn.Identity)


def test_blocks_follow_the_models_dtype_and_mode(tv_model):
    model = tv_model("mobilenet_v3_small").double().train()
    result = inject(model, "-1", input_size=SMALL, report=False)
    block = result.model.get_submodule("features.11.ulsam")
    assert block.dw.weight.dtype == torch.float64
    assert block.training
    out = result.model(torch.randn(2, *SMALL, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_a_retrofitted_model_takes_more_blocks_but_not_twice_at_one_stage(tv_model):
    first = inject(tv_model("mobilenet_v2"), "features.13", input_size=SMALL, report=False)
    second = inject(first.model, "features.16", input_size=SMALL, report=False)
    blocks = [n for n, m in second.model.named_modules() if isinstance(m, ULSAM)]
    assert blocks == ["features.13.ulsam", "features.16.ulsam"]
    assert type(second.model).__name__ == "MobileNetV2"
    with pytest.raises(PositionError, match=r"features\.13 has a ULSAM block already"):
        inject(first.model, "features.13", input_size=SMALL, report=False)


def test_a_foreign_ulsam_attribute_is_not_overwritten():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ulsam = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pw(self.dw(self.ulsam(x)))

    with pytest.raises(TraceError, match="already has an attribute 'ulsam'"):
        inject(Net(), "all", input_size=(3, 8, 8), report=False)


def test_replace_a_shuffle_unit(tv_model):
    model = tv_model("shufflenet_v2_x0_5")
    gm, _ = _surgery(model, ["stage2.1", "stage3.4"], mode="replace")
    assert not any(k.startswith(("stage2.1.", "stage3.4.")) for k in gm.state_dict())
    identity_blocks(gm)
    skipped = copy.deepcopy(model)
    skipped.stage2[1] = nn.Identity()
    skipped.stage3[4] = nn.Identity()
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), skipped(x))
