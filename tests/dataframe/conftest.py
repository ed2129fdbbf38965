"""Shared fixtures: one process-pool session per test module (workers are spawned once), fresh random data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import seekstack.dataframe as sp


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = sp.init(data_root=str(tmp_path_factory.mktemp("sp")), num_executors=2, task_memory="512MB")
    yield s
    s.shutdown()


@pytest.fixture
def inline(tmp_path):
    """A session that runs tasks in this process (cheap; for errors and plans)."""
    s = sp.init(data_root=str(tmp_path / "root"), num_executors=0, task_memory="512MB")
    yield s
    s.shutdown()


def random_frame(rng: np.random.Generator, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "k": rng.integers(0, 37, n),
            "g": rng.choice(["red", "green", "blue", "cyan", "teal"], n),
            "v": rng.normal(size=n),
            "w": rng.integers(-1000, 1000, n),
        }
    )


@pytest.fixture
def rng():
    seed = int.from_bytes(np.random.bytes(4), "little")
    print(f"seed={seed}")
    return np.random.default_rng(seed)
