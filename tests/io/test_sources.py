"""Model specs, model building and input sizes (sources.py). Nothing touches the network."""

from __future__ import annotations

import email.message
import io
import logging
import socket
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ulsam_inject.errors import (
    FetchError,
    InputSizeError,
    MissingDependencyError,
    ModelSpecError,
)
from ulsam_inject.io.sources import (
    ModelSpec,
    build_model,
    default_input_size,
    parse_input_size,
    parse_model_spec,
)

# --- a user package with model factories, importable from tmp_path ------------------------

FACTORIES = """
    import torch
    from torch import nn

    def build_net(width=4, num_classes=10):
        return nn.Sequential(
            nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(width, num_classes),
        ).train()

    def build_any(**kwargs):
        return nn.Linear(kwargs.get("n", 2), 2)

    def not_a_model():
        return {"weights": torch.zeros(1)}

    def broken():
        raise ValueError("width must be even")

    class Zoo:
        @staticmethod
        def small(width=2):
            return nn.Conv2d(3, width, 1)

    NUMBER = 42
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package ``<name>.models`` on sys.path, named per test so imports never collide."""
    name = f"userpkg_{uuid.uuid4().hex}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(FACTORIES))
    (package / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    (package / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


# --- parse_model_spec ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "zoo", "canonical"),
    [
        ("torchvision:mobilenet_v2", "torchvision", "torchvision:mobilenet_v2"),
        ("  TorchVision:MobileNet_V2 ", "torchvision", "torchvision:mobilenet_v2"),
        ("timm:mobilenetv3_large_100", "timm", "timm:mobilenetv3_large_100"),
        ("timm:efficientnet_b3.ra2_in1k", "timm", "timm:efficientnet_b3.ra2_in1k"),
        ("torchvision.models:resnet18", "callable", "torchvision.models:resnet18"),
    ],
)
def test_parse_model_spec_accepts_valid_specs(text: str, zoo: str, canonical: str) -> None:
    if zoo == "timm":
        pytest.importorskip("timm")
    spec = parse_model_spec(text)
    assert (spec.zoo, spec.spec) == (zoo, canonical)
    assert dict(spec.kwargs) == {}


def test_parse_callable_spec_to_user_module_and_dotted_attribute(user_package: str) -> None:
    spec = parse_model_spec(f"{user_package}.models:Zoo.small", {"width": 3})
    assert spec.zoo == "callable"
    assert spec.spec == f"{user_package}.models:Zoo.small"
    model = build_model(spec)
    assert isinstance(model, nn.Conv2d) and model.out_channels == 3


def test_spec_kwargs_are_a_read_only_json_copy() -> None:
    given_kwargs: dict[str, Any] = {"num_classes": 10, "dims": (1, 2)}
    spec = parse_model_spec("torchvision:mobilenet_v2", given_kwargs)
    given_kwargs["num_classes"] = 5
    assert spec.kwargs["num_classes"] == 10  # the caller's dict is not shared
    assert spec.kwargs["dims"] == [1, 2]  # JSON-normalised: what a recipe will rebuild
    with pytest.raises(TypeError, match="does not support item assignment"):
        spec.kwargs["num_classes"] = 3  # type: ignore[index]
    same = parse_model_spec("torchvision:mobilenet_v2", {"dims": [1, 2], "num_classes": 10})
    assert spec == same and hash(spec) == hash(same)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layer": object()}, "JSON values"),
        ({"ratio": float("nan")}, "JSON values"),
        ({"not an identifier": 1}, "identifiers"),
    ],
)
def test_spec_rejects_kwargs_that_cannot_go_in_a_recipe(
    kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ModelSpecError, match=fragment):
        parse_model_spec("torchvision:mobilenet_v2", kwargs)


def test_model_spec_constructed_directly_is_validated() -> None:
    with pytest.raises(ModelSpecError, match="valid sources: torchvision, timm, callable"):
        ModelSpec("keras", "mobilenet")
    with pytest.raises(ModelSpecError, match=r"package\.module:callable"):
        ModelSpec("callable", "no_colon_here")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["empty model spec", "torchvision:NAME"]),
        ("   ", ["empty model spec"]),
        ("mobilenet_v2", ["names no source", "did you mean 'torchvision:mobilenet_v2'"]),
        ("torchvision:", ["names no model"]),
        (
            "torchvision:mobilenetv2",
            [
                "unknown torchvision model 'mobilenetv2'",
                "mobilenet_v2",
                "torchvision.models.list_models()",
            ],
        ),
        ("my pkg:build", ["malformed model spec"]),
        ("pkg.mod:1build", ["malformed model spec"]),
        ("pkg..mod:build", ["malformed model spec"]),
        ("pkg.mod:a:b", ["malformed model spec"]),
        (
            "no_such_pkg_xyz.models:build",
            ["cannot import module 'no_such_pkg_xyz.models'", "no module named 'no_such_pkg_xyz'"],
        ),
        ("torchvision.models:resnet181", ["has no attribute 'resnet181'", "did you mean resnet18"]),
    ],
)
def test_parse_model_spec_errors_say_what_is_wrong(text: str, fragments: list[str]) -> None:
    with pytest.raises(ModelSpecError) as caught:
        parse_model_spec(text)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_callable_spec_errors_from_user_modules(user_package: str) -> None:
    with pytest.raises(ModelSpecError, match=r"importing module .*no_such_dependency_xyz"):
        parse_model_spec(f"{user_package}.needs_missing:build")
    with pytest.raises(ModelSpecError, match="RuntimeError: boom at import"):
        parse_model_spec(f"{user_package}.raises:build")
    with pytest.raises(ModelSpecError, match=r"Zoo has no attribute 'smal'.*did you mean small"):
        parse_model_spec(f"{user_package}.models:Zoo.smal")
    with pytest.raises(ModelSpecError, match="is a int, not a callable"):
        parse_model_spec(f"{user_package}.models:NUMBER")


def test_unknown_timm_names_and_tags() -> None:
    pytest.importorskip("timm")
    with pytest.raises(
        ModelSpecError,
        match=r"unknown timm model 'mobilenetv3_larg_100'.*"
        r"mobilenetv3_large_100.*timm.list_models\(\)",
    ):
        parse_model_spec("timm:mobilenetv3_larg_100")
    with pytest.raises(
        ModelSpecError, match=r"unknown pretrained tag 'nope'.*efficientnet_b3.ra2_in1k"
    ):
        parse_model_spec("timm:efficientnet_b3.nope")


def test_timm_missing_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import timm` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "timm", None)
    for call in (
        lambda: parse_model_spec("timm:mobilenetv3_large_100"),
        lambda: build_model(ModelSpec("timm", "mobilenetv3_large_100")),
        lambda: default_input_size(ModelSpec("timm", "mobilenetv3_large_100")),
    ):
        with pytest.raises(MissingDependencyError, match=r'pip install "ulsam-inject\[timm\]"'):
            call()
    # torchvision specs do not need timm.
    assert parse_model_spec("torchvision:mobilenet_v2").zoo == "torchvision"


# --- build_model -------------------------------------------------------------------------


def test_build_torchvision_model_with_kwargs_in_eval_mode() -> None:
    model = build_model(parse_model_spec("torchvision:mobilenet_v2", {"num_classes": 7}))
    assert not model.training
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_build_timm_model_in_eval_mode() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:mobilenetv3_small_050")
    assert not model.training
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_build_callable_model_with_kwargs(user_package: str) -> None:
    model = build_model(parse_model_spec(f"{user_package}.models:build_net", {"num_classes": 3}))
    assert not model.training  # the factory returned it in train mode
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "kwargs", "fragments"),
    [
        ("torchvision:mobilenet_v2", {"bogus": 1}, ["bogus", "TypeError"]),
        ("torchvision:mobilenet_v2", {"weights": "DEFAULT"}, ["'weights'", "--pretrained"]),
        ("{pkg}.models:build_net", {"depth": 3}, ["'depth'", "accepted: width, num_classes"]),
        ("{pkg}.models:build_any", {"n": "two"}, ["TypeError", '{"n": "two"}']),
        ("{pkg}.models:broken", {}, ["ValueError: width must be even"]),
        ("{pkg}.models:not_a_model", {}, ["returned a dict", "torch.nn.Module"]),
    ],
)
def test_build_errors_name_the_bad_arguments(
    user_package: str, spec: str, kwargs: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ModelSpecError) as caught:
        build_model(parse_model_spec(spec.format(pkg=user_package), kwargs))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_pretrained_callable_is_refused(user_package: str) -> None:
    with pytest.raises(ModelSpecError, match=r"needs a model zoo.*--checkpoint FILE"):
        build_model(f"{user_package}.models:build_net", pretrained=True)


class _Response:
    """A urlopen() response that sends ``body`` then, if ``fail``, drops the connection."""

    def __init__(self, body: bytes, fail: bool) -> None:
        self.stream = io.BytesIO(body)
        self.fail = fail
        self.headers = email.message.Message()
        self.headers["Content-Length"] = str(len(body) * 4)

    def info(self) -> email.message.Message:
        return self.headers

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        if not chunk and self.fail:
            raise ConnectionResetError(104, "Connection reset by peer")
        return chunk

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *args: object) -> None:
        return None


@pytest.mark.parametrize("fail", [True, False], ids=["connection-dropped", "bad-hash"])
def test_failed_torchvision_download_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    # torch.hub's urlopen answers with half a file, then either drops the connection or
    # ends a body whose hash is wrong; the cache in tmp_path must stay empty.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: _Response(b"\x00" * 5000, fail))
    with pytest.raises(FetchError) as caught:
        build_model("torchvision:mobilenet_v2", pretrained=True)
    message = str(caught.value)
    assert "pretrained weights of torchvision:mobilenet_v2 could not be fetched" in message
    assert "--checkpoint FILE" in message and "\n" not in message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_failed_timm_download_is_a_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    # Offline mode makes huggingface_hub fail at once, as it does after its retries
    # without a network; the cache is an empty folder so nothing can be found there.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FetchError, match=r"could not be fetched.*--checkpoint FILE"):
        build_model("timm:mobilenetv3_small_050", pretrained=True)


def test_unreachable_hub_fails_at_once_and_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No retries for a minute: an unreachable Hub means its cache only, for this call."""
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    probed: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float) -> None:
        probed.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    with pytest.raises(FetchError, match=r"Hub is unreachable, and its local cache has no copy"):
        build_model("timm:mobilenetv3_small_050", pretrained=True)
    assert len(probed) == 1  # one probe, no retries
    assert constants.HF_HUB_OFFLINE is False and logger.level == level  # restored
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]


# --- default_input_size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs", "size"),
    [
        ("torchvision:mobilenet_v2", {}, (3, 224, 224)),
        ("torchvision:efficientnet_b3", {}, (3, 300, 300)),
        ("torchvision:inception_v3", {}, (3, 299, 299)),
        ("torchvision:vit_b_16", {"image_size": 160}, (3, 160, 160)),
        # detection presets keep the image size: no crop to read
        ("torchvision:ssdlite320_mobilenet_v3_large", {}, (3, 224, 224)),
        ("torchvision.models:efficientnet_b3", {}, (3, 224, 224)),
    ],
)
def test_default_input_size_torchvision_and_callable(
    spec: str, kwargs: dict[str, Any], size: tuple[int, int, int]
) -> None:
    assert default_input_size(parse_model_spec(spec, kwargs)) == size


@pytest.mark.parametrize(
    ("spec", "kwargs", "size"),
    [
        ("timm:mobilenetv3_large_100", {}, (3, 224, 224)),
        ("timm:efficientnet_b3", {}, (3, 288, 288)),
        ("timm:efficientnet_b3", {"in_chans": 1}, (1, 288, 288)),
        ("timm:efficientnet_b3", {"img_size": [256, 192]}, (3, 256, 192)),
    ],
)
def test_default_input_size_timm(
    spec: str, kwargs: dict[str, Any], size: tuple[int, int, int]
) -> None:
    pytest.importorskip("timm")
    assert default_input_size(parse_model_spec(spec, kwargs)) == size


def test_default_input_size_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("default_input_size tried to download")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    assert default_input_size("torchvision:efficientnet_b1") == (3, 240, 240)


# --- parse_input_size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("224", (3, 224, 224)),
        (" 224 ", (3, 224, 224)),
        ("224x160", (3, 224, 160)),
        ("224 X 160", (3, 224, 160)),
        ("1x64x48", (1, 64, 48)),
    ],
)
def test_parse_input_size_accepts_the_three_forms(text: str, size: tuple[int, int, int]) -> None:
    assert parse_input_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "0", "224x0", "-224", "224.0", "224x", "x224", "3x224x224x1", "abc", "2e2", "22 4"]
)
def test_parse_input_size_rejects_bad_values(text: str) -> None:
    with pytest.raises(InputSizeError) as caught:
        parse_input_size(text)
    message = str(caught.value)
    assert repr(text) in message and "HxW" in message and "CxHxW" in message


@given(st.text(alphabet="0123456789xX\u00d7 -.+e\t", max_size=14))
def test_parse_input_size_returns_positive_sizes_or_raises_input_size_error(text: str) -> None:
    try:
        size = parse_input_size(text)
    except InputSizeError:
        return
    assert len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)


@given(st.tuples(*[st.integers(1, 4096)] * 3))
def test_parse_input_size_round_trips(size: tuple[int, int, int]) -> None:
    assert parse_input_size("x".join(map(str, size))) == size
