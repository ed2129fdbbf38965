"""One small harness for every benchmark: warm-up, repeats, median; a table on stdout and JSON on disk.

Machines here are noisy, so every figure a benchmark reports is a ratio against a baseline or a ceiling measured
in the same run, never an absolute time compared with a number from another day.

>>> import time
>>> t = measure(lambda: time.sleep(0.001), warmup=1, repeats=3)
>>> report = Report("example", columns=["case", "ms", "speedup"])
>>> report.add("sleep", t * 1e3, 1.0)
>>> path = report.emit()  # prints the table, writes benchmarks/results/example.json
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("SEEKSTACK_BENCH_DIR", "benchmarks/results"))


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
    min_time: float = 0.0,
) -> float:
    """Median wall time of `fn()` in seconds after `warmup` calls.

    `sync` (e.g. `torch.cuda.synchronize`) runs after every call so asynchronous work is counted. With `min_time`,
    repeats continue until that many seconds have been spent in total (at least `repeats` calls).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats or spent < min_time:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def hardware() -> dict[str, object]:
    """What the numbers were measured on: CPU model, cores, GPU, library versions."""
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass
class Report:
    """A benchmark's table: named columns, one row per case, plus free-form notes (targets, verdicts)."""

    name: str
    columns: list[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)

    def add(self, *values: object) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"row has {len(values)} values, table has {len(self.columns)} columns")
        self.rows.append(list(values))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["seekstack"] + sys.argv[1:]) if sys.argv else "",
            "hardware": hardware(),
            "params": self.params,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
        }

    def emit(self, results_dir: str | Path | None = None) -> Path:
        """Print the table (and notes) and write `<results_dir>/<name>.json`; returns the JSON path."""
        from seekstack.cli.console import console, print_table

        data = self.as_dict()
        print_table(f"{self.name} — {data['hardware']['cpu']}", self.columns, self.rows)
        for n in self.notes:
            console.print(f"  {n}")
        out = Path(results_dir) if results_dir is not None else RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        console.print(f"  results: {path}")
        return path
