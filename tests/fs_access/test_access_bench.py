"""The benchmark helper fills another report's columns by name (a smoke run at a tiny size; no speed asserted)."""

from __future__ import annotations

from seekstack.bench import Report
from seekstack.fs.access_bench import run


def test_rows_fill_the_fs_report_columns(local):
    report = Report("t", columns=["case", "seekstack.fs", "local disk", "ratio", "target"])
    run(report, local, None, file_mib=2, repeats=1)
    cases = [r[0] for r in report.rows]
    assert cases == [
        "batched I/O 4 KiB random read IOPS",
        "batched I/O 1 MiB read GB/s",
        "KVCache get_many (64 x 256 KiB) GB/s",
    ]
    for _, value, base, ratio, target in report.rows:
        assert value > 0 and base > 0 and ratio > 0 and target.startswith("baseline")
    assert local.listdir("/") == []  # the helper cleans up after itself
