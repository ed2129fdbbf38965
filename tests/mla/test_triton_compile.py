"""The kernels compile for real CUDA targets (sm_80, sm_86, sm_90) even without a GPU, and their tiles fit the
targets' shared memory: the first choice on Hopper (227 KB a block), the last fallback on consumer Ampere/Ada
(99 KB). Runs aot_compile.py in a subprocess because it needs TRITON_INTERPRET=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HOPPER_SMEM, CONSUMER_SMEM = 227 * 1024, 99 * 1024


@pytest.mark.slow
def test_kernels_compile_for_cuda_targets():
    script = Path(__file__).with_name("aot_compile.py")
    cases = ["sm90-h128", "sm90-h16", "sm80-h128", "sm86-fallback", "sm90-combine"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script), *cases], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == set(cases)
    assert results["sm90-h128"]["shared"] <= HOPPER_SMEM and results["sm90-h16"]["shared"] <= HOPPER_SMEM
    assert results["sm86-fallback"]["shared"] <= CONSUMER_SMEM
