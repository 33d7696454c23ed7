"""Shared fixtures. Models are built without weights; nothing touches the network."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def _share_cores_between_xdist_workers() -> Iterator[None]:
    """Under ``pytest -n N``, give each worker its share of the cores.

    Every worker would otherwise start torch's default thread pool (one thread per core):
    N workers oversubscribe the cores and torch's threads wait on each other, making small
    ops many times slower.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny tensors gain nothing from threads and lose a lot
    on a busy machine, and timing tests run steadier."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def mnv2() -> nn.Module:
    """A seeded, weightless torchvision MobileNetV2 in eval mode, one per test module."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None).eval()


@pytest.fixture
def tv_model() -> Callable[..., nn.Module]:
    """``tv_model(name, **kwargs)``: a seeded, weightless torchvision model in eval mode."""

    def make(name: str, **kwargs: object) -> nn.Module:
        torch.manual_seed(0)
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()

    return make


@pytest.fixture
def timm_model() -> Callable[..., nn.Module]:
    """``timm_model(name, **kwargs)``: a seeded, weightless timm model in eval mode."""
    timm = pytest.importorskip("timm")

    def make(name: str, **kwargs: object) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs).eval()

    return make
