"""The demo stage and the benchmark run end to end (tiny settings) and report what they claim."""

from __future__ import annotations

import json

import seekstack.bench.harness as harness
from seekstack.gemm import bench, demo


def test_demo(tmp_path):
    summary = demo.run_demo(tmp_path)
    data = json.loads((tmp_path / "gemm_demo.json").read_text())
    assert data["dense"]["calc_diff"] < 1e-3
    assert data["contiguous"]["calc_diff"] < 1e-3 and data["masked"]["calc_diff"] < 1e-3
    assert data["masked"]["padding_untouched"]
    fp8, fp32 = data["fp8linear"]["fp8_losses"], data["fp8linear"]["fp32_losses"]
    assert fp8[-1] < 0.2 * fp8[0] and fp8[-1] < 2 * fp32[-1]
    assert "calc_diff" in summary["dense FP8 GEMM"]


def test_bench_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    assert bench.main(["--quick", "--repeats", "1"]) == 0
    data = json.loads((tmp_path / "gemm.json").read_text())
    assert data["columns"][-2:] == ["fp8/base time", "calc_diff"]
    assert len(data["rows"]) == 3
    assert all(float(r[-1]) < 1e-3 and r[-2] > 0 for r in data["rows"])
