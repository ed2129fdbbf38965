"""`seekstack bench fs` at a tiny size: the table has every case, with ratios against the local disk."""

import json

from seekstack.cli.main import main


def test_bench_fs_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr("seekstack.bench.harness.RESULTS_DIR", tmp_path)
    argv = ["bench", "fs", "--size-mb", "4", "--block-mb", "2", "--repeats", "1", "--files", "5", "--no-access"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "fs.json").read_text())
    rows = {r[0]: r for r in data["rows"]}
    cases = ("seq write, durable (fsync/syncfs)", "seq read, cold (evicted)", "  (info) seq write, page cache")
    for case in cases + ("  (info) seq read, warm (page cache)",):
        fs_rate, local_rate, ratio = rows[case][1:4]
        assert fs_rate > 0 and local_rate > 0
        assert abs(ratio - fs_rate / local_rate) < 0.01 * max(ratio, 1e-3) + 1e-3
    assert any("small-file create" in c for c in rows)
    # the targets are the issue's, on the rows that touch the local disk; info rows carry none
    assert rows["seq write, durable (fsync/syncfs)"][4] == ">= 0.25" and rows["seq read, cold (evicted)"][4] == ">= 0.5"
    assert rows["  (info) seq read, warm (page cache)"][4] == "-"
