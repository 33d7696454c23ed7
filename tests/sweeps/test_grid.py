"""The grid: position sets x modes x g, resolved to stage names; malformed lists refused."""

from __future__ import annotations

import pytest
from torch import nn

from ulsam_inject import find_stages
from ulsam_inject.errors import GroupsError, ModeError, PositionError, UlsamUsageError
from ulsam_inject.sweeps.grid import (
    check_group_values,
    check_mode_values,
    make_grid,
    parse_list,
    split_sets,
)


def test_sets_are_split_on_semicolons() -> None:
    assert split_sets("13; features.16 ;13,16") == ["13", "features.16", "13,16"]
    with pytest.raises(UlsamUsageError, match="empty position set"):
        split_sets("13;;16")


def test_groups_and_modes_are_checked_and_deduplicated() -> None:
    assert check_group_values(parse_list("4, 2,4,8", "groups")) == [4, 2, 8]
    assert check_mode_values(["after", "replace", "after"]) == ["after", "replace"]
    with pytest.raises(GroupsError, match="positive integer"):
        check_group_values(["0"])
    with pytest.raises(GroupsError, match="positive integer"):
        check_group_values(["four"])
    with pytest.raises(ModeError, match="not one of: after, replace"):
        check_mode_values(["sideways"])
    with pytest.raises(UlsamUsageError, match="comma-separated"):
        parse_list("1,,2", "groups")


def test_grid_order_resolution_and_duplicate_sets(mnv2: nn.Module) -> None:
    stages = find_stages(mnv2)
    grid = make_grid(["13", "features.14", "features.13,16"], [2, 4], ["after", "replace"], stages)
    # "13" is index 13, i.e. features.14: the same set as "features.14", kept once.
    assert [(c.at, c.stages, c.mode, c.groups) for c in grid] == [
        ("13", ("features.14",), "after", 2),
        ("13", ("features.14",), "after", 4),
        ("13", ("features.14",), "replace", 2),
        ("13", ("features.14",), "replace", 4),
        ("features.13,16", ("features.13", "features.17"), "after", 2),
        ("features.13,16", ("features.13", "features.17"), "after", 4),
        ("features.13,16", ("features.13", "features.17"), "replace", 2),
        ("features.13,16", ("features.13", "features.17"), "replace", 4),
    ]
    assert grid[0].key() == {"stages": ["features.14"], "groups": 2, "mode": "after"}


def test_a_position_naming_no_stage_is_the_users_mistake(mnv2: nn.Module) -> None:
    with pytest.raises(PositionError, match=r"features\.99"):
        make_grid(["features.13", "features.99"], [4], ["after"], find_stages(mnv2))
