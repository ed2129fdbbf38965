"""Fixtures for the MLA tests: a fresh random generator per test, its seed printed so a failure can be replayed."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen(seed):
    print(f"inputs from torch.Generator().manual_seed({seed})")  # shown with a failing test's captured output
    return torch.Generator().manual_seed(seed)
