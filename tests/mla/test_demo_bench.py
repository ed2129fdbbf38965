"""The demo stage and the benchmark run end to end (the benchmark on two tiny shapes)."""

from __future__ import annotations

import json

from seekstack.mla.bench import flops_and_bytes, main
from seekstack.mla.demo import run_demo


def test_demo(tmp_path):
    summary = run_demo(tmp_path)
    assert {"batch", "plan", "fp8 cache", "sparse"} <= set(summary)
    assert "656 bytes/token" in summary["fp8 cache"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_flashmla_formulas():
    """FlashMLA's counts for b = 128, s_q = 1, h_q = 128, s_k = 4096 (flashmla.md, worked lower bounds)."""
    flops, nbytes = flops_and_bytes(128, 1, 128, 1, 4096)
    assert round(flops / 1e9, 1) == 146.0
    assert round(nbytes / 1e6, 1) == 639.6
    _, fp8_bytes = flops_and_bytes(128, 1, 128, 1, 4096, kv_bytes_per_token=656)
    assert round(fp8_bytes / 1e6, 1) == 379.6


def test_bench_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "mla.json").read_text())
    assert data["columns"][:4] == ["b", "h_q", "s_q", "s_k"] and len(data["rows"]) == 2
    assert data["params"]["copy_GBps"] > 0 and data["params"]["matmul_TFLOPs"] > 0
    assert any("ceilings, same run" in n for n in data["notes"])
    assert all(row[-1] != "-" for row in data["rows"]), "speed-up over the reference is reported"
