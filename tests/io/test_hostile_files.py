"""Hostile files and values through the API: a file is data, sizes are bounded, writes are whole.

The CLI side (subprocesses, signals, memory) is in tests/cli/test_hostile_inputs.py.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import snapshot
from safetensors.torch import save_file

from ulsam_inject import count, find_stages, inject, load, load_retrofit, save, trace_model
from ulsam_inject.errors import (
    ArtifactError,
    InputSizeError,
    ModelArgumentError,
    ModelSpecError,
    OutputError,
    RecipeVersionError,
    UntrustedRecipeError,
    WriteError,
    first_line,
)
from ulsam_inject.guards import echo
from ulsam_inject.io.artifact import FORMAT, RECIPE_KEY, read_artifact, read_recipe
from ulsam_inject.io.sources import build_model, check_file_spec, parse_model_spec

PLAN = [{"at": "features.13", "groups": 4, "mode": "after"}]


def recipe(**fields: Any) -> dict[str, Any]:
    base = {"format": FORMAT, "model": "torchvision:mobilenet_v2", "model_kwargs": {}}
    return {**base, "plan": PLAN, "input_size": [3, 64, 64], **fields}


def write(path: Path, content: Any) -> Path:
    """A file in the format its suffix names, holding ``content`` as its recipe."""
    text = content if isinstance(content, str) else json.dumps(content)
    if path.suffix == ".pt":
        torch.save({"format": FORMAT, "recipe": text, "state_dict": {"w": torch.ones(1)}}, path)
    else:
        save_file({"w": torch.ones(1)}, str(path), metadata={RECIPE_KEY: text})
    return path


def tampered(marker: Path) -> dict[str, Any]:
    return recipe(model="os:system", model_kwargs={"command": f"touch {marker}"})


def test_the_payload_is_live_when_typed(tmp_path: Path) -> None:
    # The same spec typed by the user runs (as it should): so the refusals below are the
    # gate's doing, not a payload that could never work.
    marker = tmp_path / "typed"
    spec = parse_model_spec("os:system", {"command": f"touch {marker}"})
    with pytest.raises(ModelSpecError, match="returned a int"):
        build_model(spec)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_never_runs_a_callable_from_a_file(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "MARKER"
    path = write(tmp_path / f"m{suffix}", tampered(marker))
    with pytest.raises(UntrustedRecipeError) as raised:
        load(path)
    message = str(raised.value)
    assert "'os:system'" in message and "--trust-recipe" in message
    assert "trust_recipe=True" in message and "\n" not in message
    assert not marker.exists()
    read_recipe(path)  # reading is data only
    read_artifact(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pretrained": True},
        {"weights": "DEFAULT"},
        {"weights_backbone": "DEFAULT"},
        {"checkpoint_path": "/etc/passwd"},
        {"pretrained_cfg_overlay": {"file": "/tmp/x.pth"}},
        {"pretrained_cfg": {"url": "https://example.com/x.pth"}},
        {"cache_dir": "/tmp"},
        {"block_args": {"nested": ["hf-hub:timm/whatever"]}},
    ],
)
def test_a_file_may_not_pass_arguments_that_reach_out(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UntrustedRecipeError, match="network or other files"):
        check_file_spec("timm:mobilenetv3_small_050", kwargs, origin="m.safetensors")
    check_file_spec("timm:mobilenetv3_small_050", kwargs, origin="m", trust=True)


@pytest.mark.parametrize(
    "model",
    ["os:system", "torchvision.models:resnet18", "timm:hf-hub:timm/x", "timm:../../x", 7],
)
def test_a_file_may_only_name_zoo_models(model: Any) -> None:
    with pytest.raises(UntrustedRecipeError):
        check_file_spec(model, {}, origin="m.pt")


def test_plain_zoo_recipes_load_and_trust_allows_callables(tmp_path: Path) -> None:
    result = inject(
        "torchvision:mobilenet_v2",
        at="features.13",
        input_size=(3, 64, 64),
        model_kwargs={"num_classes": 10, "width_mult": 0.5},
        report=False,
    )
    path = save(result, tmp_path / "m.pt")
    assert load_retrofit(path).plan.to_list() == PLAN
    # The same file naming a factory by its module path: refused, then allowed with trust.
    recipe_, state = read_artifact(path)
    recipe_["model"] = "torchvision.models:mobilenet_v2"
    other = tmp_path / "callable.safetensors"
    save_file(state, str(other), metadata={RECIPE_KEY: json.dumps(recipe_)})
    with pytest.raises(UntrustedRecipeError, match=r"torchvision\.models:mobilenet_v2"):
        load(other)
    assert load_retrofit(other, trust_recipe=True).plan.to_list() == PLAN


TYPE_CONFUSED = [
    ("plan-entry-list", recipe(plan=[["features.13", 4, "after"]]), "plan[0]"),
    ("plan-not-list", recipe(plan={"at": "features.13"}), "'plan'"),
    ("plan-empty", recipe(plan=[]), "'plan'"),
    ("groups-string", recipe(plan=[{**PLAN[0], "groups": "4"}]), "plan[0].groups"),
    ("groups-bool", recipe(plan=[{**PLAN[0], "groups": True}]), "plan[0].groups"),
    ("mode-other", recipe(plan=[{**PLAN[0], "mode": "inside"}]), "plan[0].mode"),
    ("input-size-strings", recipe(input_size=["3", "64", "64"]), "input_size"),
    ("input-size-huge", recipe(input_size=[3, 10**6, 10**6]), "input_size"),
    ("model-number", recipe(model=5), "'model'"),
    ("kwargs-list", recipe(model_kwargs=[1, 2]), "model_kwargs"),
    ("recipe-list", [1, 2, 3], "is a list"),
    ("format-other", recipe(format="something/1"), "'format'"),
]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    ("content", "field"), [pytest.param(c, f, id=name) for name, c, f in TYPE_CONFUSED]
)
def test_fields_of_the_wrong_type_name_the_file_and_the_field(
    tmp_path: Path, suffix: str, content: Any, field: str
) -> None:
    path = write(tmp_path / f"m{suffix}", content)
    with pytest.raises(ArtifactError) as raised:
        load(path)
    message = str(raised.value)
    assert str(path) in message and field in message and "\n" not in message
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_newer_format_says_what_was_found_and_what_is_read(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"m{suffix}", recipe(format="ulsam-inject/2"))
    if suffix == ".pt":  # the payload's own format field is what a newer release changes
        torch.save({"format": "ulsam-inject/2", "recipe": "{}", "state_dict": {}}, path)
    with pytest.raises(RecipeVersionError) as raised:
        load(path)
    message = str(raised.value)
    assert "'ulsam-inject/2'" in message and "reads ulsam-inject/1" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"__metadata__": ["a", "list"], "w": {}}, "'__metadata__'"),
        ({"__metadata__": {RECIPE_KEY: {"not": "a string"}}}, RECIPE_KEY),
    ],
)
def test_safetensors_headers_of_the_wrong_type(tmp_path: Path, header: Any, field: str) -> None:
    data = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(data).to_bytes(8, "little") + data)
    with pytest.raises(ArtifactError, match=field) as raised:
        load(path)
    assert str(path) in str(raised.value)


# -- writes -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_retrofit() -> Any:
    return inject(
        "torchvision:mobilenet_v2", at="features.13", input_size=(3, 32, 32), report=False
    )


def test_a_full_disk_is_a_write_error_and_leaves_nothing(
    tmp_path: Path, small_retrofit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def full(*args: Any, **kwargs: Any) -> None:
        # What safetensors raises on ENOSPC: its Rust I/O error, as text.
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    (tmp_path / "old.safetensors").write_bytes(b"the old file")
    before = snapshot(tmp_path)
    for name, force in (("new.safetensors", False), ("old.safetensors", True)):
        with pytest.raises(WriteError) as raised:
            save(small_retrofit, tmp_path / name, force=force)
        assert raised.value.exit_code == 1
        assert "No space left on device" in str(raised.value) and name in str(raised.value)
        assert snapshot(tmp_path) == before

    def torch_full(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(WriteError, match="ENOSPC"):
        save(small_retrofit, tmp_path / "new.pt")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["x" * 300 + ".safetensors", "model.txt", "model.onnx", "m"])
def test_names_and_suffixes_that_cannot_be_written(
    tmp_path: Path, small_retrofit: Any, name: str
) -> None:
    with pytest.raises(OutputError) as raised:
        save(small_retrofit, tmp_path / name)
    assert raised.value.exit_code == 2 and len(str(raised.value)) < 400
    assert snapshot(tmp_path) == {}


def test_a_long_but_valid_name_is_written(tmp_path: Path, small_retrofit: Any) -> None:
    # 250 bytes: the temporary file's name must not push past the 255-byte limit.
    name = "y" * 238 + ".safetensors"
    save(small_retrofit, tmp_path / name)
    assert sorted(snapshot(tmp_path)) == [name]


# -- models and sizes -----------------------------------------------------------------------


def test_meta_models_and_other_types_are_refused() -> None:
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.mobilenet_v2()
    for call, name in ((lambda: inject(net, at=13), "inject"), (lambda: count(net), "count")):
        with pytest.raises(ModelArgumentError, match="meta device") as raised:
            call()
        assert str(raised.value).startswith(f"{name}(): ")
    with pytest.raises(ModelArgumentError, match="got str 'x'"):
        count("x")  # type: ignore[arg-type]
    with pytest.raises(ModelArgumentError, match="got int 3"):
        inject(3, at=1)  # type: ignore[arg-type]
    with pytest.raises(ModelArgumentError, match=r"find_stages\(\) takes .* got str 'x'"):
        find_stages("x")  # type: ignore[arg-type]
    with pytest.raises(ModelArgumentError, match=r"trace_model\(\) takes .* got list"):
        trace_model([])  # type: ignore[arg-type]


def test_huge_input_sizes_are_refused_before_any_work() -> None:
    import torchvision

    net = torchvision.models.mobilenet_v2()
    with pytest.raises(InputSizeError, match="at most 4096"):
        inject(net, at=13, input_size=(3, 10**6, 10**6))
    with pytest.raises(InputSizeError, match="at most 4096"):
        count(net, (3, 4097, 224))


def test_echo_and_first_line_bound_what_messages_repeat() -> None:
    assert len(echo("a" * 100_000)) < 120
    meta = (
        "aten::equal: attempted to run this operator with Meta tensors, but there was no fake "
        "impl or Meta kernel registered. You may have run into this message while using an "
        "operator with PT2 compilation APIs (torch.compile/torch.export)"
    )
    assert first_line(meta, limit=240).endswith("Meta kernel registered")
    long = "word " * 100
    cut = first_line(long, limit=50)
    assert cut.endswith(" ...") and len(cut) <= 54 and "wor ..." not in cut
