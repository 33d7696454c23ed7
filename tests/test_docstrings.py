"""The examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ulsam_inject


def _modules_with_examples() -> list[str]:
    names = [ulsam_inject.__name__] + [
        name
        for _, name, _ in pkgutil.walk_packages(ulsam_inject.__path__, prefix="ulsam_inject.")
        if name != "ulsam_inject.__main__"
    ]
    finder = doctest.DocTestFinder()
    return sorted(
        name
        for name in names
        if any(test.examples for test in finder.find(importlib.import_module(name)))
    )


MODULES = _modules_with_examples()


def test_the_public_modules_have_examples() -> None:
    for name in (
        "block.module",
        "surgery.inject",
        "cost.count",
        "graph.stages",
        "surgery.positions",
        "io.artifact",
        "measure.bench",
    ):
        assert f"ulsam_inject.{name}" in MODULES


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
