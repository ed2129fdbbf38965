"""`seekstack demo`: runs each stage of the system that exists so far and prints a summary.

Stages are listed in `seekstack.cli.registry.DEMO_STAGES`; each returns a few `name: value` lines.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from seekstack.cli.console import console, status
from seekstack.cli.registry import DEMO_STAGES, available


def run_demo(workdir: str | Path = "seekstack-demo", only: list[str] | None = None) -> int:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages = [s for s in available(DEMO_STAGES) if not only or s.name in only]
    if only:
        unknown = set(only) - {s.name for s in stages}
        if unknown:
            raise SystemExit(f"seekstack demo: unknown or unavailable stage(s): {', '.join(sorted(unknown))}")
    results: list[tuple[str, str, float, dict[str, str]]] = []
    for i, stage in enumerate(stages, 1):
        t0 = time.perf_counter()
        with status(f"[{i}/{len(stages)}] {stage.name}: {stage.help}"):
            try:
                summary = stage.load().run_demo(workdir / stage.name)
                outcome = "ok"
            except Exception as exc:  # a failing stage is reported, the others still run
                traceback.print_exc()
                summary, outcome = {"error": f"{type(exc).__name__}: {exc}"}, "FAILED"
        elapsed = time.perf_counter() - t0
        results.append((stage.name, outcome, elapsed, summary))
        console.print(f"[{i}/{len(stages)}] {stage.name}: {outcome} in {elapsed:.1f} s")

    console.print()
    console.print("seekstack demo — summary")
    for name, outcome, elapsed, summary in results:
        console.print(f"  {name:<10} {outcome:<6} {elapsed:6.1f} s")
        for key, value in summary.items():
            console.print(f"      {key}: {value}")
    failed = [r for r in results if r[1] != "ok"]
    return 1 if failed else 0
