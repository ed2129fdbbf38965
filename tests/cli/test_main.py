"""The console script and the benchmark harness."""

import json
import subprocess
import sys

import pytest

from seekstack.bench import Report, measure
from seekstack.cli.main import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "bench", "eplb"):
        assert name in out


def test_python_dash_m(tmp_path):
    out = subprocess.run([sys.executable, "-m", "seekstack", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "bench" in out.stdout


def test_bench_list_and_unknown(capsys):
    assert main(["bench", "--list"]) == 0
    assert "eplb" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown benchmark"):
        main(["bench", "no-such-bench"])


def test_demo_unknown_stage(tmp_path):
    with pytest.raises(SystemExit, match="unknown or unavailable"):
        main(["demo", "--workdir", str(tmp_path), "--only", "nope"])


def test_measure_and_report(tmp_path):
    calls = []
    t = measure(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and t >= 0
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)
    report = Report("unit", ["case", "ms"])
    report.add("a", 1.5)
    with pytest.raises(ValueError, match="columns"):
        report.add("too", "many", "values")
    path = report.emit(tmp_path)
    data = json.loads(path.read_text())
    assert data["rows"] == [["a", 1.5]] and data["columns"] == ["case", "ms"] and "cpu" in data["hardware"]


def test_fs_mount_subcommands_reach_the_fuse_entry_points(capsys):
    for sub in ("mount", "umount"):
        with pytest.raises(SystemExit) as exc:
            main(["fs", sub, "--help"])
        assert exc.value.code == 0
        assert f"seekstack fs {sub}" in capsys.readouterr().out


def test_component_help_is_its_own(capsys):
    with pytest.raises(SystemExit):
        main(["fs", "--help"])
    out = capsys.readouterr().out
    assert "up" in out and "mount" in out and "status" in out
