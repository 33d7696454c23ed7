"""Fixtures shared by the surgery tests: MobileNetV2 traced at 64x64, and its stages."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ulsam_inject import Stage, Traced, find_stages, trace_model


@pytest.fixture(scope="module")
def traced() -> Traced:
    torch.manual_seed(0)
    return trace_model(torchvision.models.mobilenet_v2(weights=None).eval(), (3, 64, 64))


@pytest.fixture(scope="module")
def stages(traced: Traced) -> list[Stage]:
    return find_stages(traced)
