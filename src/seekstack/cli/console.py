"""Terminal output: rich when installed (the `cli` extra), plain print otherwise."""

from __future__ import annotations

import contextlib
import sys

try:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
except ImportError:  # pragma: no cover - exercised only without the cli extra
    Console = Table = None

    class _PlainConsole:
        def print(self, *objects, **_):
            print(*objects)

    console = _PlainConsole()


@contextlib.contextmanager
def status(message: str):
    """A spinner while a long step runs (a plain line without rich)."""
    if Console is not None and console.is_terminal:
        with console.status(message):
            yield
    else:
        console.print(message)
        yield


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    if Table is not None:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(*(fmt(v) for v in r))
        console.print(table)
        return
    widths = [max(len(c), *(len(fmt(r[i])) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    console.print(title)
    console.print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        console.print("  ".join(fmt(v).rjust(w) for v, w in zip(r, widths)))
