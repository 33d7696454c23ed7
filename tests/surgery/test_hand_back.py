"""inject() hands back the user's own model: its class, methods, modules, keys and hooks."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from builders import INPUT_SIZE, BlockSpec, NetSpec, build
from safetensors.torch import save_file
from torch import fx, nn

from ulsam_inject import ULSAM, inject, load, save
from ulsam_inject.errors import PositionError
from ulsam_inject.io.artifact import read_artifact
from ulsam_inject.surgery.plan import module_name_for

SMALL = (3, 64, 64)
AT = ["features.13", "features.16"]


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def test_torchvision_model_keeps_its_class_and_untouched_modules(tv_model):
    model = tv_model("mobilenet_v2")
    result = inject(model, at=AT, input_size=SMALL)
    assert type(result.model) is type(model)
    assert [p.rewrite for p in result.plan.placements] == ["stage", "stage"]
    before, after = _types(model), _types(result.model)
    touched = ("features.13", "features.16")
    for name, kind in before.items():
        if name not in touched:
            assert after[name] is kind, name  # every other module: the same class
    # The touched stage keeps its children (names, classes) and attributes.
    assert after["features.13.conv.1.0"] is before["features.13.conv.1.0"]
    assert result.model.features[13].use_res_connect == model.features[13].use_res_connect
    assert isinstance(result.model.classifier[1], nn.Linear)


def test_hooks_on_a_stage_fire_once_with_the_attended_map(tv_model):
    model = tv_model("mobilenet_v2")
    seen_before: list[torch.Tensor] = []
    model.features[13].register_forward_hook(lambda _m, _i, out: seen_before.append(out))
    result = inject(model, at=AT, input_size=SMALL)
    seen_after: list[torch.Tensor] = []
    stage = result.model.features[13]
    stage.register_forward_hook(lambda _m, _i, out: seen_after.append(out))
    block_out: list[torch.Tensor] = []
    stage.ulsam.register_forward_hook(lambda _m, _i, out: block_out.append(out))
    seen_before.clear()
    _run(result.model, torch.randn(2, *SMALL))
    assert len(seen_after) == 1 and len(block_out) == 1
    assert seen_after[0] is block_out[0]  # the stage's output is the attended map
    assert len(seen_before) == 1  # the user's own hook came along with the copy


def test_the_original_state_dict_loads_reporting_only_block_keys(tv_model):
    model = tv_model("mobilenet_v2")
    for mode, unexpected_prefix in (("after", None), ("replace", "features.13.")):
        result = inject(model, at="features.13", mode=mode, input_size=SMALL)
        fresh = copy.deepcopy(result.model)
        loaded = fresh.load_state_dict(model.state_dict(), strict=False)
        blocks = [n for n, m in fresh.named_modules() if isinstance(m, ULSAM)]
        assert blocks == (["features.13.ulsam"] if mode == "after" else ["features.13"])
        assert loaded.missing_keys and all(k.startswith(blocks[0]) for k in loaded.missing_keys)
        if unexpected_prefix is None:
            assert loaded.unexpected_keys == []
        else:
            assert loaded.unexpected_keys
            assert all(k.startswith(unexpected_prefix) for k in loaded.unexpected_keys)


def test_timm_model_keeps_its_methods_config_and_batchnorm_modules(timm_model):
    timm = pytest.importorskip("timm")
    model = timm_model("mobilenetv3_large_100")
    result = inject(model, at=["blocks.4.0", "blocks.5.0"], input_size=SMALL)
    retrofit = result.model
    assert type(retrofit) is type(model)
    assert [p.rewrite for p in result.plan.placements] == ["stage", "stage"]
    assert timm.data.resolve_model_data_config(retrofit) == timm.data.resolve_model_data_config(
        model
    )
    assert retrofit.pretrained_cfg == model.pretrained_cfg
    x = torch.randn(1, *SMALL)
    with torch.no_grad():
        features = retrofit.eval().forward_features(x)
        assert retrofit.forward_head(features).shape == (1, 1000)
    norms = [type(m).__name__ for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    kept = [
        type(m).__name__
        for n, m in retrofit.named_modules()
        if isinstance(m, nn.BatchNorm2d) and ".ulsam." not in f"{n}."
    ]
    assert kept == norms  # timm's BatchNormAct2d modules stay modules, every one of them
    retrofit.train()
    bn = retrofit.blocks[4][0].bn1
    counted = int(bn.num_batches_tracked)
    retrofit(torch.randn(2, *SMALL))
    assert int(bn.num_batches_tracked) == counted + 1
    retrofit.reset_classifier(7)
    assert retrofit(torch.randn(2, *SMALL)).shape == (2, 7)


def test_a_flat_stage_is_rewritten_in_its_parent():
    """A depthwise/pointwise pair laid flat in a Sequential is changed in that Sequential."""
    spec = NetSpec(groups=((BlockSpec("dws", 16, style="flat"), BlockSpec("dws", 16)),))
    torch.manual_seed(0)
    model = build(spec).eval()
    result = inject(model, at=0, input_size=INPUT_SIZE)
    assert [p.rewrite for p in result.plan.placements] == ["parent:features"]
    assert type(result.model) is type(model)
    assert not isinstance(result.model, fx.GraphModule)
    assert result.report is not None and result.report.blocks[0].rewrite == "parent:features"
    block = result.model.features.ulsam_0_5
    assert isinstance(block, ULSAM)
    # The same as running the block on the output of the stage's last layer.
    expected_model = copy.deepcopy(model)
    expected_model.features[5].register_forward_hook(lambda _m, _i, out: block(out))
    x = torch.randn(2, *INPUT_SIZE)
    assert torch.equal(_run(result.model, x), _run(expected_model, x))


def test_seed_gives_the_same_blocks_whatever_the_global_stream(tv_model):
    model = tv_model("mobilenet_v2")

    def blocks(seed: int) -> list[torch.Tensor]:
        result = inject(model, at=AT, input_size=SMALL, report=False, seed=seed)
        return [v for k, v in result.model.state_dict().items() if ".ulsam." in k]

    torch.manual_seed(1)
    first = blocks(7)
    torch.manual_seed(2)
    again, other = blocks(7), blocks(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_repr_is_short(tv_model):
    result = inject(tv_model("mobilenet_v2"), at="all", input_size=SMALL)
    text = repr(result)
    assert len(text) < 2000
    assert "MobileNetV2" in text and "features.13" in text and "rewrite=stage" in text


def test_pickles_deepcopies_and_exports(tv_model):
    result = inject(tv_model("mobilenet_v2"), at=AT, input_size=SMALL)
    x = torch.randn(2, *SMALL)
    expected = _run(result.model, x)
    for twin in (pickle.loads(pickle.dumps(result.model)), copy.deepcopy(result.model)):
        assert type(twin).__name__ == "MobileNetV2"
        assert torch.equal(_run(twin, x), expected)
    program = torch.export.export(result.model.eval(), (x,))
    assert torch.allclose(program.module()(x), expected, atol=1e-5)


def test_files_written_with_the_old_block_layout_still_load(tmp_path: Path, tv_model):
    """Before the stage-level rewrite, blocks were saved under ``ulsam.<stage with _>``."""
    result = inject("torchvision:mobilenet_v2", at=AT, input_size=SMALL)
    path = save(result, tmp_path / "new.safetensors")
    recipe, state = read_artifact(path)
    old_state = {}
    for key, value in state.items():
        for p in result.plan.placements:
            if key.startswith(p.module_name + "."):
                key = module_name_for(p.stage.name) + key[len(p.module_name) :]
        old_state[key] = value
    assert any(k.startswith("ulsam.features_13.") for k in old_state)
    old = tmp_path / "old.safetensors"
    save_file(old_state, str(old), metadata={"ulsam_inject.recipe": json.dumps(recipe)})
    x = torch.randn(1, *SMALL)
    assert torch.equal(_run(load(old), x), _run(load(path), x))


TENSOR_HOMES = """
import torch
from torch import nn


def pair(c):
    return [
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
    ]


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(*pair(c))
        self.spare = nn.Parameter(torch.full((3,), 5.0))  # nested, never used

    def forward(self, x):
        return self.body(x)


class Net(nn.Module):
    def __init__(self, flat=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        # flat: the first pair laid out flat beside the stem (no module of its own)
        self.features = nn.Sequential(*pair(16), Block(16)) if flat else nn.Sequential(
            Block(16), Block(16)
        )
        self.shared = self.features[-1]  # one module under two names
        self.temperature = nn.Parameter(torch.tensor(2.0))  # root, used
        self.unused = nn.Parameter(torch.tensor(3.0))  # root, never used
        self.register_buffer("mean", torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        self.register_buffer("stats", torch.full((2,), 7.0))  # root, never used

    def forward(self, x):
        return (self.features(self.stem(x - self.mean)) * self.temperature).mean((2, 3))


def net(flat=False):
    torch.manual_seed(0)
    return Net(flat).eval()
"""


@pytest.mark.parametrize(("flat", "rewrite"), [(False, "stage"), (True, "parent:features")])
def test_every_tensor_survives_inject_save_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flat: bool, rewrite: str
) -> None:
    name = f"tensorhomes{int(flat)}"
    (tmp_path / f"{name}.py").write_text(TENSOR_HOMES)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = inject(f"{name}:net", at=0, input_size=(3, 16, 16), model_kwargs={"flat": flat})
    assert [p.rewrite for p in result.plan.placements] == [rewrite]
    original = __import__(name).net(flat)
    with torch.no_grad():  # values the original's construction does not give
        original.temperature.fill_(1.5)
        original.unused.fill_(4.0)
        original.stats.fill_(9.0)
    result = inject(original, at=0, input_size=(3, 16, 16)).with_source(
        f"{name}:net", {"flat": flat}
    )
    model = result.model
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    # Root, nested, shared (under both names), used or not: every one, the same values.
    for key, value in original.named_parameters(remove_duplicate=False):
        assert torch.equal(params[key], value), key
    for key, value in original.named_buffers(remove_duplicate=False):
        assert torch.equal(buffers[key], value), key
    assert {"temperature", "unused", "shared.spare"} <= set(params)
    assert {"stats", "scratch", "mean"} <= set(buffers)
    assert "scratch" not in model.state_dict()  # non-persistent stays non-persistent
    assert set(original.state_dict()) <= set(model.state_dict())
    path = save(result, tmp_path / "m.safetensors")
    again = load(path, trust_recipe=True)
    state = again.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(_run(again, x), _run(model, x))


def test_any_module_with_a_4d_output_is_a_position(tv_model):
    """A ResNet has no depthwise/pointwise stages: its modules are positions all the same."""
    net = tv_model("resnet18")
    result = inject(net, at=["layer3.1", "layer2"], groups={"layer2": 8}, input_size=SMALL)
    assert result.plan.to_list() == [  # in execution order
        {"at": "layer2", "groups": 8, "mode": "after"},
        {"at": "layer3.1", "groups": 4, "mode": "after"},
    ]
    assert [p.stage.kind for p in result.plan.placements] == ["module", "module"]
    model = result.model
    assert type(model) is type(net) and type(model.layer2) is nn.Sequential
    assert len(model.layer2) == 3 and isinstance(model.layer2.ulsam, ULSAM)  # appended child
    assert model.layer2.ulsam.channels == 128 and model.layer3[1].ulsam.channels == 256
    x = torch.randn(2, *SMALL)
    doubled = copy.deepcopy(model)
    doubled.layer2.ulsam = Doubler()
    doubled.layer3[1].ulsam = Doubler()
    reference = copy.deepcopy(net)
    reference.layer2.register_forward_hook(lambda _m, _i, out: out * 2)
    reference.layer3[1].register_forward_hook(lambda _m, _i, out: out * 2)
    assert torch.allclose(_run(doubled, x), _run(reference, x), atol=1e-6)


def test_module_positions_that_cannot_hold_a_block_are_refused(tv_model):
    net = tv_model("resnet18")
    with pytest.raises(PositionError, match=r"'fc'.*2-D"):
        inject(net, at="fc", input_size=SMALL)
    with pytest.raises(PositionError, match="no depthwise/pointwise stages; name modules"):
        inject(net, at="all", input_size=SMALL)
    with pytest.raises(PositionError, match=r"lies inside stage 'features\.13'"):
        inject(tv_model("mobilenet_v2"), at="features.13.conv", input_size=SMALL)


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2
