"""The usage examples in the module docstrings run (inline executor, so they stay cheap)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "seekstack.dataframe",
    "seekstack.dataframe.dataframe",
    "seekstack.dataframe.session",
    "seekstack.dataframe.io",
    "seekstack.dataframe.errors",
    "seekstack.dataframe.execution.duck",
    "seekstack.dataframe.logical.nodes",
    "seekstack.dataframe.sort.gensort",
    "seekstack.dataframe.sort.validate",
    "seekstack.dataframe.sort.pipeline",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
