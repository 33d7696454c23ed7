"""Plans: per-position groups and modes, module names, checked before any surgery."""

from __future__ import annotations

import pytest

from ulsam_inject import make_plan
from ulsam_inject.errors import (
    GroupsError,
    ModeError,
    PositionError,
    ReplaceError,
    UlsamUsageError,
)
from ulsam_inject.surgery.plan import module_name_for


def test_one_groups_value_for_every_position(stages):
    plan = make_plan(stages, ["features.16", "features.13"], groups=8)
    assert plan.to_list() == [
        {"at": "features.13", "groups": 8, "mode": "after"},
        {"at": "features.16", "groups": 8, "mode": "after"},
    ]
    assert [p.module_name for p in plan.placements] == ["ulsam.features_13", "ulsam.features_16"]
    assert [p.channels for p in plan.placements] == [96, 160]


def test_groups_and_mode_mappings_by_position(stages):
    plan = make_plan(
        stages,
        "12-15",
        groups={"features.13": 2, "-3": 16},  # -3 is features.15
        mode={"features.16": "replace", "12": "replace"},  # 12 is features.13
    )
    assert plan.to_list() == [
        {"at": "features.13", "groups": 2, "mode": "replace"},
        {"at": "features.14", "groups": 4, "mode": "after"},
        {"at": "features.15", "groups": 16, "mode": "after"},
        {"at": "features.16", "groups": 4, "mode": "replace"},
    ]


def test_module_names_are_valid_identifiers():
    assert module_name_for("features.13") == "ulsam.features_13"
    assert module_name_for("layers.3-7") == "ulsam.layers_3_7"
    assert module_name_for("trunk_output.block1.block1-0") == "ulsam.trunk_output_block1_block1_0"


def test_groups_not_dividing_names_the_stage_and_the_valid_groups(stages):
    with pytest.raises(GroupsError) as info:
        make_plan(stages, "features.14", groups=7)  # 160 channels
    message = str(info.value)
    assert "groups=7" in message and "160 channels of features.14" in message
    assert "1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 80, 160" in message


def test_groups_mapping_is_checked_per_stage(stages):
    # 16 divides 96 (features.13) but not 24 (features.3).
    make_plan(stages, "features.13", groups={"features.13": 16})
    with pytest.raises(
        GroupsError, match=r"groups=16 does not divide the 24 channels of features\.3"
    ):
        make_plan(stages, ["features.3", "features.13"], groups={"all": 16})


@pytest.mark.parametrize("groups", [0, -4, True, 2.0, "4", None])
def test_malformed_groups(stages, groups):
    with pytest.raises(GroupsError, match="valid groups there: 1, 2, 3, 4"):
        make_plan(stages, "features.13", groups=groups)


def test_replace_refuses_a_stage_that_changes_shape(stages):
    with pytest.raises(ReplaceError) as info:
        make_plan(stages, "features.14", mode="replace")
    message = str(info.value)
    assert "cannot replace features.14" in message
    assert "96 channels to 160 at stride 2" in message
    assert "use mode 'after'" in message


def test_unknown_mode(stages):
    with pytest.raises(ModeError, match=r"mode 'before' for features\.13 is not one of"):
        make_plan(stages, "features.13", mode="before")


@pytest.mark.parametrize("groups", [0, -4, True, "4", 2.0])
def test_groups_must_be_a_positive_int(stages, groups):
    with pytest.raises(GroupsError, match=r"groups must be a positive integer.*valid groups there"):
        make_plan(stages, "features.13", groups=groups)


def test_a_mapping_entry_outside_the_positions_is_refused(stages):
    with pytest.raises(
        PositionError, match=r"groups given for 'features\.16', which is not among the chosen"
    ):
        make_plan(stages, "features.13", groups={"features.16": 8})
    with pytest.raises(PositionError, match=r"mode given for 'features\.1\*'"):
        make_plan(stages, "features.2", mode={"features.1*": "replace"})
    # A glob that reaches some chosen stage is fine.
    plan = make_plan(stages, "12-13", groups={"features.1*": 8})
    assert [p.groups for p in plan.placements] == [8, 8]


def test_unknown_position_in_a_mapping(stages, traced):
    with pytest.raises(
        PositionError, match=r"in the groups mapping: unknown position 'features\.99'"
    ):
        make_plan(stages, "features.13", groups={"features.99": 2}, traced=traced)


def test_plan_errors_are_usage_errors(stages):
    for kwargs in ({"groups": 7}, {"mode": "replace", "at": "features.14"}):
        with pytest.raises(UlsamUsageError, match=r"features\.14"):
            make_plan(stages, **({"at": "features.14"} | kwargs))
