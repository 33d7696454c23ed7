"""``ulsam-inject explain`` as users run it: the real script on the tiny model at 32x32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import (
    TINY_SIZE,
    TINY_SPEC,
    assert_one_line_error,
    run_cli,
    snapshot,
    tiny_importable,
    write_tiny_module,
)
from PIL import Image

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("matplotlib")
# Each test starts the real script in a subprocess (torch imported anew each time).
pytestmark = pytest.mark.slow

SIZE = ("--input-size", TINY_SIZE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's module, two images, a text file named .png, a retrofitted file."""
    folder = tmp_path_factory.mktemp("inputs")
    write_tiny_module(folder)
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    Image.radial_gradient("L").convert("RGB").save(folder / "round.jpg")
    (folder / "notes.png").write_text("not an image")
    from ulsam_inject import inject, save

    with tiny_importable(folder) as tinynet:
        torch.manual_seed(0)  # fixed weights: with random ones a map can be all zeros
        torch.save(tinynet.tiny().state_dict(), folder / "tiny.pt")
        torch.manual_seed(0)
        retrofit = inject(tinynet.tiny().eval(), at="0", groups=2, input_size=(3, 32, 32))
        save(retrofit, folder / "retrofitted.safetensors", source=TINY_SPEC)
    return folder


def test_figure_and_json_for_two_images(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "explain", TINY_SPEC, "--checkpoint", ws / "tiny.pt", *SIZE,
        "--image", ws / "red.png", "--image", ws / "round.jpg",
        "--out", "fig.png", "--json", "--top-k", "3",
        cwd=tmp_path, pythonpath=ws,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == [f"wrote {tmp_path.resolve() / 'fig.png'}"]
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_SIGNATURE
    document = result.json()
    assert document["schema"] == "ulsam-inject.explain/1"
    assert document["images"] == ["red.png", "round.jpg"]
    assert document["method"] == "gradcam++"
    assert len(document["maps"]) == 2
    for found in document["maps"]:
        assert found["layer"] == "features"
        assert found["input_size"] == [32, 32]
        assert len(found["predictions"]) == 3
        # tinynet has no class names: indices.
        assert [p["name"] for p in found["predictions"]] == [
            str(p["index"]) for p in found["predictions"]
        ]
        assert 0 <= found["peak"][0] < 32 and 0 <= found["peak"][1] < 32
        assert 0.1 <= found["top10_mass"] <= 1.0


def test_a_retrofitted_file_with_attention_and_a_class(ws: Path, tmp_path: Path) -> None:
    result = run_cli(
        "explain", ws / "retrofitted.safetensors", TINY_SPEC, *SIZE, "--image", ws / "red.png",
        "--attention", "--class", "3", "--layer", "features.0", "--json", "--trust-recipe",
        cwd=tmp_path, pythonpath=ws,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    ulsam, plain = result.json()["maps"]
    assert ulsam["attention"] == {"features.0.ulsam": 2} and plain["attention"] == {}
    assert ulsam["target"]["index"] == plain["target"]["index"] == 3
    assert ulsam["layer"] == plain["layer"] == "features.0"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--image", "{ws}/notes.png"), ("notes.png' is not an image",)),
        (("--image", "{ws}/red.png", "--layer", "featurs.2"), ("did you mean features.2",)),
        (("--image", "{ws}/red.png", "--method", "gradcam3"), ("is not one of",)),
        (("--image", "{ws}/red.png", "--out", "old.png"), ("exists",)),
        (("--image", "{ws}/red.png", "--out", "fig.jpg"), ("must end in .png or .svg",)),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    ws: Path, tmp_path: Path, extra: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    (tmp_path / "old.png").write_bytes(b"kept")
    before = snapshot(tmp_path)
    args = [part.format(ws=ws) for part in extra]
    result = run_cli("explain", TINY_SPEC, *SIZE, *args, cwd=tmp_path, pythonpath=ws)
    assert_one_line_error(result, 2, *fragments)
    assert snapshot(tmp_path) == before
