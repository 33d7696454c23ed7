"""Position specs: indices, ranges, names, globs, 'all', lists; clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ulsam_inject import Stage, find_stages, resolve_positions, trace_model
from ulsam_inject.errors import PositionError, UlsamUsageError
from ulsam_inject.surgery.positions import split_spec


def names(spec, stages, traced=None):
    return [s.name for s in resolve_positions(spec, stages, traced)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (0, ["features.1"]),
        ("12", ["features.13"]),
        (-1, ["features.17"]),
        ("-17", ["features.1"]),
        ("12-14", ["features.13", "features.14", "features.15"]),
        ("3-3", ["features.4"]),
        ("features.13", ["features.13"]),
        ("features.1?", [f"features.1{i}" for i in range(8)]),
        ("features.[23]", ["features.2", "features.3"]),
        (["features.16", 0, "-1"], ["features.1", "features.16", "features.17"]),
        ("features.16, 0,-1", ["features.1", "features.16", "features.17"]),
        (("1-2", "features.2", 2), ["features.2", "features.3"]),
        (range(2), ["features.1", "features.2"]),
    ],
)
def test_specs_resolve_in_execution_order_without_duplicates(stages, spec, expected):
    assert names(spec, stages) == expected


def test_all_and_globs(stages):
    assert names("all", stages) == [s.name for s in stages]
    assert names("features.1*", stages) == ["features.1"] + [f"features.1{i}" for i in range(8)]


def _stage(i: int, name: str) -> Stage:
    return Stage(i, name, "depthwise-separable", 8, 8, 1, 4, 4, False, True, "", "", (), ())


def test_names_that_read_as_indices():
    # A flat stage at the root of a Sequential is named like a range.
    stages = [_stage(0, "3-8"), _stage(1, "9-14"), *(_stage(i, f"b{i}") for i in range(2, 10))]
    assert names("1-2", stages) == ["9-14", "b2"]
    assert names("9-14", stages) == ["9-14"]  # out of range as indices: only a name
    with pytest.raises(PositionError, match=r"'3-8' is ambiguous: it names stage 0 .* -10 for"):
        resolve_positions("3-8", stages)


def test_an_int_is_always_an_index():
    # The stages of a model whose root is a Sequential: named "1", "2", "3".
    stages = [_stage(i, str(i + 1)) for i in range(3)]
    assert names(1, stages) == ["2"]
    assert names([0, 2], stages) == ["1", "3"]
    assert names("0", stages) == ["1"]  # no stage is named "0": an index
    assert names("-2", stages) == ["2"]  # negative indices are never names
    with pytest.raises(
        PositionError,
        match=r"'1' is ambiguous: it names stage 0 and also reads as index 1; .* -3 for '1', "
        r"or -2 for '2'",
    ):
        resolve_positions("1", stages)
    assert names("3", stages) == ["3"]  # index 3 is out of range: only a name


def test_index_out_of_range_says_what_is_valid(stages):
    with pytest.raises(PositionError, match=r"index 17 is out of range.*17 stages.*0\.\.16"):
        resolve_positions(17, stages)
    with pytest.raises(PositionError, match=r"-18.*-17\.\.-1"):
        resolve_positions("-18", stages)


@pytest.mark.parametrize("spec", ["5-3", "10-17"])
def test_bad_ranges(stages, spec):
    with pytest.raises(PositionError, match=rf"range '{spec}' is invalid.*0\.\.16.*start <= end"):
        resolve_positions(spec, stages)


def test_unknown_name_suggests_close_ones(stages):
    with pytest.raises(
        PositionError, match=r"unknown position 'feature.13'.*did you mean.*features\.13"
    ):
        resolve_positions("feature.13", stages)
    with pytest.raises(PositionError, match=r"unknown position 'zzz'; stages are features\.1"):
        resolve_positions("zzz", stages)


def test_glob_matching_nothing(stages):
    with pytest.raises(PositionError, match=r"pattern 'blocks\.\*' matches no stage.*17 in all"):
        resolve_positions("blocks.*", stages)


@pytest.mark.parametrize("spec", ["", "1,,2", [], [" "]])
def test_empty_positions(stages, spec):
    with pytest.raises(PositionError, match="empty position"):
        resolve_positions(spec, stages)


@pytest.mark.parametrize("spec", [True, 1.5, None, [None], [[1, 2]], {"a": 1}])
def test_positions_of_the_wrong_type(stages, spec):
    with pytest.raises(PositionError, match="a position is an int or a string"):
        resolve_positions(spec, stages)


def test_a_module_that_is_not_a_stage_is_a_module_position(stages, traced):
    (stem,) = resolve_positions("features.0", stages, traced)
    assert (stem.name, stem.kind, stem.index, stem.out_channels) == ("features.0", "module", -1, 32)
    # In execution order among stages: the stem comes first.
    assert [s.name for s in resolve_positions("features.2,features.0", stages, traced)] == [
        "features.0",
        "features.2",
    ]


def test_module_inside_a_stage_names_the_stage(stages, traced):
    with pytest.raises(
        PositionError, match=r"'features\.13\.conv\.1' lies inside stage 'features\.13'"
    ):
        resolve_positions("features.13.conv.1", stages, traced)


def test_activation_that_is_not_4d_is_refused(stages, traced):
    with pytest.raises(PositionError, match=r"'classifier'.*2-D.*\(1, 1000\).*4-D"):
        resolve_positions("classifier", stages, traced)


def test_position_inside_an_untraceable_leaf_says_why():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
            self.odd = Untraceable()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.odd(self.block(self.stem(x)))

    traced = trace_model(Net(), (3, 8, 8))
    stages = find_stages(traced)
    assert [s.name for s in stages] == ["block"]
    with pytest.raises(
        PositionError, match=r"'odd\.conv' lies inside 'odd'.*cannot trace.*control flow"
    ):
        resolve_positions("odd.conv", stages, traced)
    with pytest.raises(PositionError, match=r"'odd' is a leaf, a submodule torch\.fx cannot trace"):
        resolve_positions("odd", stages, traced)


def test_model_without_stages():
    with pytest.raises(PositionError, match="no depthwise/pointwise stages"):
        resolve_positions("all", [])


def test_position_errors_are_usage_errors(stages):
    with pytest.raises(UlsamUsageError, match="99"):
        resolve_positions(99, stages)
    with pytest.raises(ValueError, match="99"):
        resolve_positions(99, stages)


def test_split_spec():
    assert split_spec("1, 2,features.3") == ["1", "2", "features.3"]
    assert split_spec([1, "2-3"]) == [1, "2-3"]
