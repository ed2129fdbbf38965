"""Test-wide set-up.

Without a GPU, Triton kernels run in Triton's CPU interpreter; TRITON_INTERPRET must be set before any
`@triton.jit` decorator runs, so it is set here, before any seekstack kernel module is imported.
Tests marked `gpu` are skipped when CUDA is absent.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test run, printed on failure so a case can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value
