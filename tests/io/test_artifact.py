"""Retrofitted-model files (artifact.py): weights + recipe, rebuilt bit for bit elsewhere.

The round trip that matters runs in fresh processes: one saves a model whose ULSAM weights
and BatchNorm statistics are far from their defaults, another loads the files and runs
them; the outputs must be identical (torch.equal), not merely close.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from cli_helpers import snapshot, subprocess_env, tiny_importable, write_tiny_module
from safetensors import safe_open
from safetensors.torch import save_file

from ulsam_inject import ULSAM, Retrofit, export_program, inject, load, load_retrofit, save
from ulsam_inject.errors import ArtifactError, CheckpointError, OutputError, UlsamUsageError
from ulsam_inject.io.artifact import FORMAT, RECIPE_KEY, is_artifact, read_artifact, read_recipe

SPEC = "torchvision:mobilenet_v2"
KWARGS = {"num_classes": 10}
SIZE = (3, 64, 64)
PLAN = [
    {"at": "features.12", "groups": 2, "mode": "replace"},
    {"at": "features.13", "groups": 4, "mode": "after"},
    {"at": "features.16", "groups": 8, "mode": "after"},
]


def make_retrofit() -> Retrofit:
    torch.manual_seed(0)
    return inject(
        SPEC,
        at=[p["at"] for p in PLAN],
        groups={p["at"]: p["groups"] for p in PLAN},
        mode={p["at"]: p["mode"] for p in PLAN},
        input_size=SIZE,
        model_kwargs=KWARGS,
    )


def block_keys(retrofit: Retrofit) -> list[str]:
    """The state-dict keys of the ULSAM blocks the retrofit added."""
    prefixes = tuple(p.module_name + "." for p in retrofit.plan.placements)
    keys = [k for k in retrofit.model.state_dict() if k.startswith(prefixes)]
    assert len(keys) >= 10 * len(prefixes)
    return keys


def perturb(model: torch.nn.Module) -> None:
    """Move every ULSAM weight and every BatchNorm statistic away from its default."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ULSAM):
                for parameter in module.parameters():
                    noise = torch.randn(parameter.shape, generator=generator)
                    parameter.add_(0.2 * noise)
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                shape = module.running_mean.shape
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
                module.num_batches_tracked.fill_(17)
    model.eval()


@pytest.fixture(scope="module")
def retrofit() -> Retrofit:
    result = make_retrofit()
    perturb(result.model)
    return result


@pytest.fixture(scope="module")
def saved(retrofit: Retrofit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("saved")
    return {
        "safetensors": save(retrofit, folder / "m.safetensors"),
        "pt": save(retrofit, folder / "m.pt"),
    }


# -- what the files hold ------------------------------------------------------------------


def check_recipe(recipe: dict[str, Any]) -> None:
    assert recipe["format"] == FORMAT
    assert recipe["model"] == SPEC
    assert recipe["model_kwargs"] == KWARGS
    assert recipe["input_size"] == list(SIZE)
    assert recipe["plan"] == PLAN
    assert set(recipe["versions"]) >= {"python", "torch", "torchvision"}


def test_safetensors_file_holds_the_weights_and_the_recipe(
    retrofit: Retrofit, saved: dict[str, Path]
) -> None:
    state = retrofit.model.state_dict()
    with safe_open(str(saved["safetensors"]), framework="pt") as handle:
        recipe = json.loads(handle.metadata()[RECIPE_KEY])
        assert set(handle.keys()) == set(state)
        for key in block_keys(retrofit):
            assert torch.equal(handle.get_tensor(key), state[key]), key
    check_recipe(recipe)


def test_pt_file_loads_with_weights_only(retrofit: Retrofit, saved: dict[str, Path]) -> None:
    payload = torch.load(saved["pt"], weights_only=True)
    assert payload["format"] == FORMAT
    check_recipe(json.loads(payload["recipe"]))
    state = retrofit.model.state_dict()
    assert set(payload["state_dict"]) == set(state)
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in state.items())


def test_both_formats_read_back_the_same(saved: dict[str, Path]) -> None:
    recipe_a, state_a = read_artifact(saved["safetensors"])
    recipe_b, state_b = read_artifact(saved["pt"])
    assert recipe_a == recipe_b
    assert set(state_a) == set(state_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert is_artifact(saved["safetensors"]) and is_artifact(saved["pt"])


def test_load_rebuilds_the_model_in_eval_mode(retrofit: Retrofit, saved: dict[str, Path]) -> None:
    loaded = load_retrofit(saved["pt"])
    assert not loaded.model.training
    assert loaded.plan.to_list() == PLAN
    assert loaded.source == SPEC and dict(loaded.source_kwargs or {}) == KWARGS
    assert loaded.input_size == SIZE
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), retrofit.model(x))


# -- writing: atomic, never over an existing file unless forced -----------------------------


def test_save_refuses_an_existing_file_unless_forced(retrofit: Retrofit, tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists"):
        save(retrofit, target)
    assert target.read_bytes() == b"precious"
    save(retrofit, target, force=True)
    assert is_artifact(target)
    assert sorted(snapshot(tmp_path)) == ["m.safetensors"]  # no temporary file left


def test_save_never_writes_onto_the_protected_input(retrofit: Retrofit, tmp_path: Path) -> None:
    checkpoint = tmp_path / "input.pt"
    torch.save({"w": torch.ones(2)}, checkpoint)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="same file"):
        save(retrofit, checkpoint, force=True, protect=checkpoint)
    assert snapshot(tmp_path) == before


def test_save_needs_a_model_spec_to_rebuild_from(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torchvision.models.mobilenet_v2(weights=None).eval()
    result = inject(module, at="features.13", input_size=SIZE, report=False)
    with pytest.raises(ArtifactError, match="source="):
        save(result, tmp_path / "m.safetensors")
    assert snapshot(tmp_path) == {}
    path = save(result, tmp_path / "m.safetensors", source=SPEC)
    assert read_recipe(path)["model"] == SPEC


# -- reading files that are not what they should be ----------------------------------------


def write_with_recipe(path: Path, recipe: object, state: dict[str, torch.Tensor]) -> Path:
    text = recipe if isinstance(recipe, str) else json.dumps(recipe)
    save_file(state, str(path), metadata={RECIPE_KEY: text})
    return path


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def plain_torch(folder: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(1)}}, folder / "c.pt")
    return folder / "c.pt"


def plain_safetensors(folder: Path) -> Path:
    save_file({"w": torch.ones(1)}, str(folder / "c.safetensors"))
    return folder / "c.safetensors"


def recipe_file(recipe: object) -> Any:
    return lambda folder: write_with_recipe(folder / "r.safetensors", recipe, {"w": torch.ones(1)})


NOT_ARTIFACTS = [
    ("missing", lambda d: d / "nope.safetensors", "does not exist"),
    ("directory", lambda d: d, "is a directory"),
    ("empty", lambda d: written(d / "e.pt", b""), "empty"),
    ("garbage", lambda d: written(d / "g.pt", b"garbage" * 9), "not a retrofitted-model file"),
    ("plain-torch-checkpoint", plain_torch, "--checkpoint"),
    ("plain-safetensors-checkpoint", plain_safetensors, "--checkpoint"),
]
BAD_RECIPES = [
    ("recipe-not-json", recipe_file("{not json"), "not valid JSON"),
    (
        "recipe-other-format",
        recipe_file({"format": "other/9", "model": SPEC, "plan": [], "input_size": [3, 8, 8]}),
        FORMAT,
    ),
    (
        "recipe-bad-input-size",
        recipe_file({"format": FORMAT, "model": SPEC, "plan": [], "input_size": [3, 64]}),
        "input_size",
    ),
]


@pytest.mark.parametrize(
    ("make", "match"),
    [pytest.param(make, match, id=name) for name, make, match in NOT_ARTIFACTS + BAD_RECIPES],
)
def test_load_refuses_what_is_not_a_retrofitted_model(
    tmp_path: Path, make: Any, match: str
) -> None:
    path = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=match) as raised:
        load(path)
    assert isinstance(raised.value, UlsamUsageError)  # exit code 2 in the CLI
    assert "\n" not in str(raised.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("name", "make"), [(name, make) for name, make, _ in NOT_ARTIFACTS])
def test_is_artifact_is_false_for_other_files(tmp_path: Path, name: str, make: Any) -> None:
    assert not is_artifact(make(tmp_path))


def test_load_refuses_truncated_files(saved: dict[str, Path], tmp_path: Path) -> None:
    for name, path in saved.items():
        data = path.read_bytes()
        for cut in (100, len(data) // 2, len(data) - 1):
            truncated = tmp_path / f"{cut}.{name}"
            truncated.write_bytes(data[:cut])
            with pytest.raises((ArtifactError, CheckpointError), match=str(cut)):
                load(truncated)


def test_load_refuses_weights_that_do_not_fit_the_recipe(
    retrofit: Retrofit, saved: dict[str, Path], tmp_path: Path
) -> None:
    recipe, state = read_artifact(saved["safetensors"])
    state = dict(state)
    dropped = block_keys(retrofit)[-1]
    del state[dropped]
    path = write_with_recipe(tmp_path / "m.safetensors", recipe, state)
    with pytest.raises(ArtifactError, match="1 missing key") as raised:
        load(path)
    assert dropped in str(raised.value) and str(path) in str(raised.value)


# -- torch.export programs -------------------------------------------------------------------


def test_export_program_runs_without_the_library(tmp_path: Path) -> None:
    # A tiny model keeps torch.export quick; the fresh-process test exports MobileNetV2.
    write_tiny_module(tmp_path)
    with tiny_importable(tmp_path) as tinynet:
        torch.manual_seed(0)
        retrofit = inject(tinynet.tiny(), at="features.2", input_size=(3, 32, 32), report=False)
    perturb(retrofit.model)
    retrofit.model.train()
    path = export_program(retrofit, tmp_path / "m.pt2")
    assert retrofit.model.training  # the mode is restored after capturing in eval
    with pytest.raises(OutputError, match="exists"):
        export_program(retrofit, path)
    program = torch.export.load(path).module()
    retrofit.model.eval()
    for batch in (1, 8):  # the batch dimension is dynamic: no guard fails on batch 8
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(program(x), retrofit.model(x), rtol=1e-5, atol=1e-5)
    assert sorted(snapshot(tmp_path)) == ["m.pt2", "tinynet.py"]


# -- the round trip across processes, bit for bit ---------------------------------------------

SAVER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {shared!r}]
from test_artifact import block_keys, make_retrofit, perturb

from ulsam_inject import export_program, save

out = Path(sys.argv[1])
result = make_retrofit()
perturb(result.model)
save(result, out / "m.safetensors")
save(result, out / "m.pt")
export_program(result, out / "m.pt2")
x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
with torch.no_grad():
    y, y1 = result.model(x), result.model(x[:1])
reference = {{"x": x, "y": y, "y1": y1, "state": result.model.state_dict()}}
torch.save({{**reference, "block_keys": block_keys(result)}}, out / "ref.pt")
"""

LOADER = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from ulsam_inject import load

out = Path(sys.argv[1])
x = torch.load(out / "ref.pt", weights_only=True)["x"]
outputs, states, training = {}, {}, {}
for name in ("m.safetensors", "m.pt"):
    model = load(out / name)
    training[name] = model.training
    with torch.no_grad():
        outputs[name] = model(x)
    states[name] = model.state_dict()
with torch.no_grad():
    outputs["m.pt2"] = torch.export.load(out / "m.pt2").module()(x)
torch.save({"outputs": outputs, "states": states, "training": training}, out / "loaded.pt")
"""


def run_python(script: str, folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # two fresh Python processes, each importing torch
def test_fresh_process_rebuilds_bitwise_identical_outputs(tmp_path: Path) -> None:
    here = Path(__file__).parent
    saver = SAVER.format(tests=str(here), shared=str(here.parent))
    run_python(textwrap.dedent(saver), tmp_path)
    files = snapshot(tmp_path)
    run_python(textwrap.dedent(LOADER), tmp_path)
    assert {k: v for k, v in snapshot(tmp_path).items() if k in files} == files  # untouched

    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert torch.isfinite(ref["y"]).all()
    # The perturbation reached the saved model: nothing is at its default any more.
    stats = [k for k in ref["block_keys"] if k.endswith(("running_var", "running_mean"))]
    assert len(stats) >= 2 * len(PLAN)
    for key in stats:
        default = 1.0 if key.endswith("running_var") else 0.0
        assert not torch.equal(ref["state"][key], torch.full_like(ref["state"][key], default))
    for name in ("m.safetensors", "m.pt"):
        assert loaded["training"][name] is False
        assert torch.equal(loaded["outputs"][name], ref["y"]), name
        state = loaded["states"][name]
        assert set(state) == set(ref["state"])
        assert all(torch.equal(state[k], v) for k, v in ref["state"].items()), name
    # The program takes the whole batch of 3 (its batch dimension is dynamic).
    torch.testing.assert_close(loaded["outputs"]["m.pt2"], ref["y"], rtol=1e-5, atol=1e-5)
