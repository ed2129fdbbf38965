"""Buffer dispatch/combine (normal and low-latency), events, autograd and failure handling on spawned gloo groups.

Each world size is one spawn (module-scoped) that runs every check in `_checks.py`; the tests read its results.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from seekstack.ep.launch import run_ranks

CHECKS_FILE = Path(__file__).with_name("_checks.py")
_spec = importlib.util.spec_from_file_location("_ep_checks_parent", CHECKS_FILE)
checks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = checks
_spec.loader.exec_module(checks)

NAMES = [n for n in checks.CHECKS if n not in checks.LAST_ONLY_2_RANKS]
SEED = int(os.environ.get("SEEKSTACK_TEST_SEED") or int.from_bytes(os.urandom(3), "little"))  # failures print it

pytestmark = pytest.mark.distributed


def _run(world_size: int, names: list[str]):
    return run_ranks(str(CHECKS_FILE), "run_checks", world_size, args=(SEED, names), timeout_s=240)


@pytest.fixture(scope="module")
def results_2():
    return _run(2, NAMES + checks.LAST_ONLY_2_RANKS)


@pytest.fixture(scope="module")
def results_4():
    return _run(4, NAMES)


def _assert_ok(results, name: str) -> None:
    failures = [f"rank {r}:\n{res[name][1]}" for r, res in enumerate(results) if not res[name][0]]
    assert not failures, f"seed {SEED}\n" + "\n".join(failures)


@pytest.mark.parametrize("name", NAMES + checks.LAST_ONLY_2_RANKS)
def test_two_ranks(results_2, name):
    _assert_ok(results_2, name)


@pytest.mark.parametrize("name", NAMES)
def test_four_ranks(results_4, name):
    _assert_ok(results_4, name)


@pytest.mark.parametrize("transport", ["p2p", "shm"])
def test_dead_peer_raises_instead_of_hanging(transport):
    results = run_ranks(str(CHECKS_FILE), "dead_peer", 2, args=(SEED, transport), timeout_s=60, allow_missing=True)
    assert results[1] is None, "rank 1 exits without a result"
    r0 = results[0]
    assert r0["error"] is not None, "dispatch with a dead peer must raise EPCommError"
    assert "token exchange" in r0["error"], r0["error"]
    # shared windows watch the peers' pidfds, so an exit is seen at once; sockets see it when gloo does
    assert r0["seconds"] < (5 if transport == "shm" else 20), r0


def test_demo_reports_bit_exact(tmp_path):
    from seekstack.ep.demo import run_demo

    summary = run_demo(tmp_path)
    assert summary["ok"] == "True", summary
    assert "MISMATCH" not in " ".join(summary.values())


def test_bench_rejects_bad_arguments():
    from seekstack.ep.bench import main

    bad = [["--hidden", "100"], ["--ranks", "0"], ["--experts", "10", "--ranks", "4"], ["--backend", "mpi"]]
    if not torch.cuda.is_available():
        bad.append(["--backend", "nccl"])
    for argv in bad:
        with pytest.raises(SystemExit):
            main(argv)


@pytest.fixture(scope="module")
def results_2_all_to_all():
    names = [n for n in NAMES if n not in checks.GLOO_ONLY + checks.SHM_ONLY]
    return run_ranks(str(CHECKS_FILE), "run_checks", 2, args=(SEED, names, "all_to_all"), timeout_s=240)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in checks.GLOO_ONLY + checks.SHM_ONLY])
def test_two_ranks_all_to_all_transport(results_2_all_to_all, name):
    """The NCCL wire (one all_to_all_single per field) run on gloo, where it can be tested without a GPU."""
    _assert_ok(results_2_all_to_all, name)


@pytest.fixture(scope="module")
def results_2_p2p():
    names = [n for n in NAMES if n not in checks.SHM_ONLY]
    return run_ranks(str(CHECKS_FILE), "run_checks", 2, args=(SEED, names, "p2p"), timeout_s=240)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in checks.SHM_ONLY])
def test_two_ranks_p2p_transport(results_2_p2p, name):
    """The socket wire of gloo groups across hosts (per-peer isend/irecv), run here on one host."""
    _assert_ok(results_2_p2p, name)


COMPILED = [
    "check_dispatch_combine_bf16",
    "check_combine_sparse_and_full_routing",
    "check_autograd",
    "check_low_latency_bf16",
    "check_low_latency_hook_async_zero_copy",
    "check_compiled_sum_ran",  # last: the ones above took the compiled path
]


@pytest.fixture(scope="module", params=["shm", "p2p"])
def results_2_compiled(request):
    """The combine checks with the compiled CPU sum forced on (`SEEKSTACK_CPU_COMPILE=always`; by default only
    sums of ≥ 1M elements take it), over the shared windows and over sockets."""
    with mock.patch.dict(os.environ, {"SEEKSTACK_CPU_COMPILE": "always"}):
        return run_ranks(str(CHECKS_FILE), "run_checks", 2, args=(SEED, COMPILED, request.param), timeout_s=240)


@pytest.mark.parametrize("name", COMPILED)
def test_two_ranks_compiled_combine_sum(results_2_compiled, name):
    _assert_ok(results_2_compiled, name)
