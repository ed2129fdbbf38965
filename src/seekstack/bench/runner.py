"""`seekstack bench NAME [ARGS...]`: looks the benchmark up in the registry and runs its `main(argv)`."""

from __future__ import annotations

from seekstack.cli.console import console
from seekstack.cli.registry import BENCHMARKS, available


def run_benchmarks(name: str | None, argv: list[str], list_only: bool = False) -> int:
    entries = available(BENCHMARKS)
    if list_only or not name:
        for e in entries:
            console.print(f"  {e.name:<10} {e.help}")
        return 0
    if name == "all":
        status = 0
        for e in entries:
            console.print(f"== seekstack bench {e.name}")
            status |= int(e.load().main(list(argv)) or 0)
        return status
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        names = ", ".join(e.name for e in entries)
        raise SystemExit(f"seekstack bench: unknown benchmark {name!r}; available: {names}")
    return int(entry.load().main(list(argv)) or 0)
