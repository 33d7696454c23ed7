"""inject(): the result users rely on (weights, outputs, modes, pickling, re-tracing)."""

from __future__ import annotations

import copy
import operator
import pickle

import pytest
import torch
from builders import INPUT_SIZE, build, expected_stages, nets
from checks import assert_same_random_train_outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

from ulsam_inject import ULSAM, Retrofit, Stage, find_stages, inject, trace_model
from ulsam_inject.block.module import divisors
from ulsam_inject.errors import GroupsError, PositionError, ReplaceError
from ulsam_inject.surgery.rewrite import identity_blocks

SMALL = (3, 64, 64)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def mobilenet_v2(tv_model):
    return tv_model("mobilenet_v2")


@pytest.fixture
def retrofit(mobilenet_v2) -> Retrofit:
    return inject(mobilenet_v2, at=["features.13", "features.16"], input_size=SMALL)


def test_every_new_module_is_a_ulsam_with_a_readable_name(retrofit):
    blocks = {n: m for n, m in retrofit.model.named_modules() if isinstance(m, ULSAM)}
    assert sorted(blocks) == ["features.13.ulsam", "features.16.ulsam"]
    assert [(b.channels, b.groups) for b in blocks.values()] == [(96, 4), (160, 4)]
    assert [p.rewrite for p in retrofit.plan.placements] == ["stage", "stage"]
    assert retrofit.plan.to_list() == [
        {"at": "features.13", "groups": 4, "mode": "after"},
        {"at": "features.16", "groups": 4, "mode": "after"},
    ]
    assert len(retrofit.stages) == 17 and retrofit.leaves == {}
    assert retrofit.input_size == SMALL


def test_original_weights_keep_their_keys_and_values(mobilenet_v2, retrofit):
    original = mobilenet_v2.state_dict()
    new = retrofit.model.state_dict()
    assert set(original) <= set(new)
    assert all(torch.equal(new[k], v) for k, v in original.items())
    added = set(new) - set(original)
    assert added and all(k.startswith(("features.13.ulsam.", "features.16.ulsam.")) for k in added)


def test_the_original_checkpoint_loads_with_only_new_keys_missing(mobilenet_v2, retrofit):
    fresh = inject(
        copy.deepcopy(mobilenet_v2).apply(_reinit),
        at=["features.13", "features.16"],
        input_size=SMALL,
    )
    result = fresh.model.load_state_dict(mobilenet_v2.state_dict(), strict=False)
    assert result.unexpected_keys == []
    # BatchNorm fills a missing num_batches_tracked itself, without reporting it.
    assert set(result.missing_keys) == _new_keys(fresh.model)
    x = torch.randn(2, *SMALL)
    assert torch.equal(_run(identity_blocks(fresh.model), x), _run(mobilenet_v2, x))


def _new_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the ULSAM blocks (but num_batches_tracked)."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, ULSAM)]
    return {
        k
        for k in model.state_dict()
        if any(k.startswith(f"{b}.") for b in blocks) and not k.endswith("num_batches_tracked")
    }


def _reinit(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
        module.reset_parameters()
        nn.init.normal_(module.weight)


def test_replace_checkpoint_keys(mobilenet_v2):
    result = inject(
        mobilenet_v2, at=["features.13", "features.15"], mode="replace", input_size=SMALL
    )
    original = mobilenet_v2.state_dict()
    loaded = result.model.load_state_dict(original, strict=False)
    assert set(loaded.missing_keys) == _new_keys(result.model)
    assert set(loaded.unexpected_keys) == {
        k for k in original if k.startswith(("features.13.", "features.15."))
    }
    kept = set(original) - set(loaded.unexpected_keys)
    assert all(torch.equal(result.model.state_dict()[k], original[k]) for k in kept)


def test_identity_blocks_give_exactly_the_original_outputs(mobilenet_v2):
    result = inject(mobilenet_v2, at="all", input_size=SMALL)
    x = torch.randn(2, *SMALL)
    expected = _run(mobilenet_v2, x)
    assert not torch.equal(_run(result.model, x), expected)  # the blocks do act
    assert torch.equal(_run(identity_blocks(result.model), x), expected)


def test_the_model_passed_in_is_not_modified(tv_model):
    model = tv_model("mobilenet_v2").train()
    model.features[3].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    modules = {n: type(m) for n, m in model.named_modules()}
    result = inject(model, at="all", mode={"features.5": "replace"}, input_size=SMALL)
    assert {n: type(m) for n, m in model.named_modules()} == modules
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()
    )
    # Nothing shared: training the result leaves the model's tensors alone.
    result.model.train()
    result.model(torch.randn(2, *SMALL)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in result.model.parameters()}


def test_train_and_eval_forward_and_backward(retrofit):
    model = retrofit.model.train()
    x = torch.randn(2, *SMALL)
    model(x).square().mean().backward()
    block = model.get_submodule("features.13.ulsam")
    assert all(p.grad is not None for p in block.parameters())
    # (A conv bias right before a train-mode BatchNorm gets a zero gradient: weights only.)
    assert all(block.get_parameter(f"{m}.weight").grad.abs().sum() > 0 for m in ("dw", "pw"))
    assert all(p.grad is not None for p in model.features.parameters())
    model.eval()
    out = model(x)
    out.sum().backward()
    assert out.shape == (2, 1000)


def test_pickles_and_traces_again(retrofit):
    x = torch.randn(1, *SMALL)
    expected = _run(retrofit.model, x)
    restored = pickle.loads(pickle.dumps(retrofit.model))
    assert torch.equal(_run(restored, x), expected)
    again = trace_model(retrofit.model, SMALL)
    assert torch.equal(_run(again.graph_module, x), expected)
    targets = [n.target for n in again.graph_module.graph.nodes if n.op == "call_module"]
    assert "features.13.ulsam" in targets  # ULSAM stays one call
    # Plain torch.fx traces through ULSAM too (which then runs its traceable kernels).
    plain = fx.symbolic_trace(retrofit.model)
    assert torch.allclose(_run(plain, x), expected, rtol=1e-4, atol=1e-6)


def test_copies_keep_the_structure_and_the_train_mode(tv_model):
    """Pickled (traced again from its code when loaded) or deep-copied, a retrofitted
    model keeps its stages, its stochastic depth in train mode, and takes more blocks in
    the right places (after a residual add, not before it)."""
    result = inject(tv_model("efficientnet_b0"), at="features.3.0", input_size=SMALL)
    stages = [s.to_dict() for s in find_stages(result.model, SMALL)]
    assert sum(s["residual"] for s in stages) == 9
    x = torch.randn(2, *SMALL)
    result.model.train()
    torch.manual_seed(3)
    expected = result.model(x)
    for twin in (
        pickle.loads(pickle.dumps(result.model)),
        copy.deepcopy(result.model),
        pickle.loads(pickle.dumps(copy.deepcopy(result.model))),
        copy.deepcopy(pickle.loads(pickle.dumps(result.model))),
    ):
        assert [s.to_dict() for s in find_stages(twin, SMALL)] == stages
        twin.train()
        torch.manual_seed(3)
        assert torch.equal(twin(x), expected)
        again = inject(twin, at="features.4.1", input_size=SMALL, report=False).model
        # The block joins the stage's own graph, after the stage's residual add.
        (block,) = [n for n in again.features[4][1].graph.nodes if n.target == "ulsam"]
        assert block.args[0].target is operator.add


def test_groups_mapping_and_both_modes_in_one_plan(mobilenet_v2):
    result = inject(
        mobilenet_v2,
        at="12-15",
        groups={"features.13": 8, "features.16": 1},
        mode={"features.13": "replace", "features.16": "replace"},
        input_size=SMALL,
    )
    blocks = {
        n: (m.groups, m.channels) for n, m in result.model.named_modules() if isinstance(m, ULSAM)
    }
    assert blocks == {
        "features.13": (8, 96),
        "features.14.ulsam": (4, 160),
        "features.15.ulsam": (4, 160),
        "features.16": (1, 160),
    }
    assert [p.mode for p in result.plan.placements] == ["replace", "after", "after", "replace"]
    assert result.model(torch.randn(1, *SMALL)).shape == (1, 1000)


def test_stochastic_depth_still_acts_in_train_mode_and_not_in_eval(tv_model):
    model = tv_model("efficientnet_b0", dropout=0.0, stochastic_depth_prob=0.5)
    result = inject(model, at="all", input_size=SMALL)
    plain = identity_blocks(copy.deepcopy(result.model))
    x = torch.randn(2, *SMALL)
    expected = _run(model, x)
    assert torch.equal(_run(plain, x), expected)
    assert torch.equal(_run(plain, x), _run(plain, x))  # eval is deterministic
    # Train mode, same random draws: the same stochastic depth as the original's.
    assert_same_random_train_outputs(plain, model, x)


def test_errors_come_before_any_surgery(mobilenet_v2):
    with pytest.raises(GroupsError, match=r"groups=7.*features\.13.*valid groups there: 1, 2, 3"):
        inject(mobilenet_v2, "features.13", groups=7, input_size=SMALL)
    with pytest.raises(ReplaceError, match=r"cannot replace features\.14"):
        inject(mobilenet_v2, "features.14", mode="replace", input_size=SMALL)
    with pytest.raises(PositionError, match="index 40 is out of range"):
        inject(mobilenet_v2, 40, input_size=SMALL)
    with pytest.raises(PositionError, match=r"'classifier'.*2-D"):
        inject(mobilenet_v2, "classifier", input_size=SMALL)


def test_recipe(retrofit):
    assert retrofit.recipe() == {
        "model": None,
        "model_kwargs": {},
        "input_size": [3, 64, 64],
        "plan": retrofit.plan.to_list(),
    }


@st.composite
def plans(draw: st.DrawFn):
    net = draw(nets(max_blocks=5))
    stages = expected_stages(net)
    chosen = draw(st.lists(st.integers(0, len(stages) - 1), min_size=1, unique=True))
    groups = {i: draw(st.sampled_from(divisors(stages[i].out_channels))) for i in chosen}
    modes = {
        i: draw(st.sampled_from(["after", "replace"])) if stages[i].replaceable else "after"
        for i in chosen
    }
    return net, chosen, groups, modes


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _doubled_at(model: nn.Module, stages: list[Stage], modes: dict[int, str]) -> nn.Module:
    """A copy of ``model`` whose chosen stages give twice their output ("after") or twice
    their input ("replace"), by forward hooks on the stages' first and last modules."""
    model = copy.deepcopy(model)
    for index, mode in modes.items():
        stage = stages[index]
        first = model.get_submodule(stage.modules[0])
        last = model.get_submodule(stage.modules[-1])
        if mode == "after":
            last.register_forward_hook(lambda _m, _i, out: out * 2)
        else:
            seen: dict[str, torch.Tensor] = {}
            first.register_forward_pre_hook(lambda _m, args, seen=seen: seen.update(x=args[0]))
            last.register_forward_hook(lambda _m, _i, _o, seen=seen: seen["x"] * 2)
    return model


@pytest.mark.slow  # 25 random plans, each traced, rewritten and run
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_injection_at_random_positions_keeps_shapes_and_outputs(case):
    net, chosen, groups, modes = case
    torch.manual_seed(0)
    model = build(net).eval()
    result = inject(model, chosen, groups=groups, mode=modes, input_size=INPUT_SIZE, report=False)
    blocks = [m for m in result.model.modules() if isinstance(m, ULSAM)]
    assert sorted(b.groups for b in blocks) == sorted(groups.values())
    x = torch.randn(2, *INPUT_SIZE)
    expected = _run(model, x)
    assert _run(result.model, x).shape == expected.shape
    plain = identity_blocks(copy.deepcopy(result.model))
    found = find_stages(plain, INPUT_SIZE)
    if all(m == "after" for m in modes.values()):
        assert torch.equal(_run(plain, x), expected)
        # The retrofitted model has the original's stages, blocks not included.
        assert [s.to_dict() for s in found] == [s.to_dict() for s in result.stages]
    else:
        # Replaced stages are gone. (Names may change: a flat pair left alone in its
        # Sequential is then named after the Sequential.)
        kept = [s for i, s in enumerate(result.stages) if modes.get(i) != "replace"]
        assert [(s.in_channels, s.out_channels) for s in found] == [
            (s.in_channels, s.out_channels) for s in kept
        ]
    # Where each block went: with every ULSAM doubling its input, the retrofitted model
    # is the original with each chosen stage's output doubled, or for a replaced stage,
    # its input doubled in place of its output.
    doubled = copy.deepcopy(result.model)
    for name, module in list(doubled.named_modules()):
        if isinstance(module, ULSAM):
            parent, _, child = name.rpartition(".")
            setattr(doubled.get_submodule(parent), child, Doubler())
    reference = _doubled_at(model, list(result.stages), modes)
    assert torch.equal(_run(doubled, x), _run(reference, x))
    result.model.train()
    result.model(x).sum().backward()
    assert all(p.grad is not None for b in blocks for p in b.parameters())
