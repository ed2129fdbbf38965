"""Buffer on CUDA tensors over NCCL: every device-independent check of `_checks.py` against the reference.

A world of one rank on cuda:0 always (NCCL refuses two ranks on one GPU; the exchanges still run through NCCL's
all_to_all_single), and two ranks on cuda:0/cuda:1 when two GPUs are present. Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from seekstack.ep.launch import run_ranks

CHECKS_FILE = Path(__file__).with_name("_checks.py")
_spec = importlib.util.spec_from_file_location("_ep_checks_gpu_parent", CHECKS_FILE)
checks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = checks
_spec.loader.exec_module(checks)

NAMES = [n for n in checks.CHECKS if n not in checks.GLOO_ONLY + checks.SHM_ONLY]  # NCCL: no shared windows
SEED = int.from_bytes(os.urandom(3), "little")

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def _run(world_size: int):
    return run_ranks(str(CHECKS_FILE), "run_checks", world_size, args=(SEED, NAMES), timeout_s=240, backend="nccl")


@pytest.fixture(scope="module")
def results_nccl_1():
    return _run(1)


@pytest.fixture(scope="module")
def results_nccl_2():
    if torch.cuda.device_count() < 2:
        pytest.skip("two NCCL ranks need two GPUs")
    return _run(2)


def _assert_ok(results, name: str) -> None:
    failures = [f"rank {r}:\n{res[name][1]}" for r, res in enumerate(results) if not res[name][0]]
    assert not failures, f"seed {SEED}\n" + "\n".join(failures)


@pytest.mark.parametrize("name", NAMES)
def test_nccl_one_rank(results_nccl_1, name):
    _assert_ok(results_nccl_1, name)


@pytest.mark.parametrize("name", NAMES)
def test_nccl_two_ranks(results_nccl_2, name):
    _assert_ok(results_nccl_2, name)
