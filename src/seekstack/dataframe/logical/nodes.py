"""Logical plan nodes. A node knows its inputs, its number of output partitions and its parameters; it runs
nothing. `label` (e.g. ``filter#7``) is how errors and `explain()` name a step.

>>> src = SourceNode("read_parquet", files=["a.parquet"])
>>> q = SqlNode("filter", [src], "SELECT * FROM {0} WHERE x > 1")
>>> q.num_partitions, q.label.startswith("filter#")
(1, True)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os

_ids = itertools.count(1)


class Node:
    kind = "node"

    def __init__(self, name: str, inputs: list[Node]):
        self.id = next(_ids)
        self.name = name
        self.inputs = list(inputs)

    @property
    def label(self) -> str:
        return f"{self.name}#{self.id}"

    @property
    def num_partitions(self) -> int:
        return self.inputs[0].num_partitions

    def params(self) -> dict:
        """Parameters that define the output (part of every task key)."""
        return {}

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params().items() if v not in (None, [], ""))
        return f"{self.label} [{self.num_partitions} partition(s)]" + (f" {extra}" if extra else "")

    def signature(self) -> str:
        text = json.dumps({"kind": self.kind, "name": self.name, **self.params()}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()

    def copy_with(self, inputs: list[Node]) -> Node:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.inputs = list(inputs)
        return clone


class SourceNode(Node):
    """Files read as one partition: parquet directly, csv/json converted to parquet by one task."""

    kind = "source"

    def __init__(self, name: str, files: list[str], fmt: str = "parquet", options: dict | None = None):
        super().__init__(name, [])
        self.files = list(files)
        self.fmt = fmt
        self.options = dict(options or {})

    @property
    def num_partitions(self) -> int:
        return 1

    def params(self) -> dict:
        stats = []
        for f in self.files:  # a changed input file must not match an old checkpoint
            try:
                st = os.stat(f)
                stats.append((f, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((f, None, None))
        return {"fmt": self.fmt, "files": stats, "options": self.options}

    def describe(self) -> str:
        opts = f" {self.options}" if self.options else ""
        return f"{self.label} [1 partition] {self.fmt}: {len(self.files)} file(s){opts}"


class SqlNode(Node):
    """A DuckDB query run per partition; ``{i}`` is partition p of input i (inputs are co-partitioned)."""

    kind = "sql"

    def __init__(self, name: str, inputs: list[Node], query: str, fused: tuple[str, ...] = ()):
        super().__init__(name, inputs)
        self.query = query
        self.fused = fused

    @property
    def label(self) -> str:
        return "+".join(self.fused) if self.fused else f"{self.name}#{self.id}"

    def params(self) -> dict:
        return {"query": self.query}

    def describe(self) -> str:
        fused = " (fused)" if self.fused else ""
        return f"{self.label} [{self.num_partitions} partition(s)]{fused} sql: {self.query}"


class PythonNode(Node):
    """A Python function per row (filter/map/flat_map) or per arrow batch (map_batches)."""

    kind = "python"

    def __init__(self, name: str, inputs: list[Node], fn, mode: str, batch_size: int = 122_880, schema=None):
        super().__init__(name, inputs)
        self.fn, self.mode, self.batch_size, self.schema = fn, mode, batch_size, schema

    def params(self) -> dict:
        from seekstack.dataframe import serialize

        fn_hash = hashlib.sha1(serialize.dumps(self.fn)).hexdigest()
        return {"mode": self.mode, "fn": fn_hash, "batch_size": self.batch_size, "schema": str(self.schema)}

    def describe(self) -> str:
        fn = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"{self.label} [{self.num_partitions} partition(s)] python {self.mode}: {fn}"


class RepartitionNode(Node):
    """Redistributes rows into `npartitions` partitions.

    mode: ``files`` (spread whole files; falls back to ``rows`` when there are fewer files than partitions),
    ``rows`` (even row counts), ``hash`` (equal `keys` together), ``column`` (the column holds the partition id),
    ``random``. `columns` is set by the optimizer when later steps need only some columns.
    """

    kind = "repartition"

    def __init__(self, name: str, inputs: list[Node], npartitions: int, mode: str, keys: list[str] | None = None):
        super().__init__(name, inputs)
        self.npartitions, self.mode, self.keys = npartitions, mode, list(keys or [])
        self.columns: list[str] | None = None

    @property
    def num_partitions(self) -> int:
        return self.npartitions

    def params(self) -> dict:
        return {"n": self.npartitions, "mode": self.mode, "keys": self.keys, "columns": self.columns}


def walk(root: Node) -> list[Node]:
    """Nodes in dependency order (inputs first), each once."""
    order, seen = [], set()

    def visit(node: Node) -> None:
        if node.id in seen:
            return
        seen.add(node.id)
        for inp in node.inputs:
            visit(inp)
        order.append(node)

    visit(root)
    return order


def explain_tree(root: Node) -> str:
    lines: list[str] = []

    def visit(node: Node, depth: int) -> None:
        lines.append("  " * depth + ("└─ " if depth else "") + node.describe())
        for inp in node.inputs:
            visit(inp, depth + 1)

    visit(root, 0)
    return "\n".join(lines)
