"""Assertions shared by the test modules."""

from __future__ import annotations

import copy

import torch
from torch import nn


def assert_same_random_train_outputs(ours: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    """In train mode, with the same random draws, ``ours`` gives exactly the original's
    output (stochastic depth, dropout drawn alike), and other draws give another output
    (the randomness acts). ``original`` is left in its mode; ``ours`` ends in train mode."""
    reference = copy.deepcopy(original).train()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(1)
        ours_out = ours(x)
        torch.manual_seed(1)
        theirs = reference(x)
        torch.manual_seed(2)
        other_draw = ours(x)
    assert torch.equal(ours_out, theirs)
    assert not torch.equal(ours_out, other_draw)
