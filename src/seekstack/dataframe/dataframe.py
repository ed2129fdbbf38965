"""The DataFrame: a lazy plan over partitions of parquet files. Transformations return new DataFrames; actions
(`count`, `take`, `take_all`, `to_pandas`, `to_arrow`, `write_parquet`) optimize the plan and run it.

>>> import tempfile, seekstack.dataframe as sp
>>> s = sp.init(data_root=tempfile.mkdtemp(), num_executors=0)
>>> df = s.from_items([{"k": i % 3, "v": i} for i in range(10)])
>>> df = df.repartition(3, hash_by="k").filter("v > 2").map("k, v * 10 AS v10")
>>> sorted(r["v10"] for r in df.take_all())
[30, 40, 50, 60, 70, 80, 90]
>>> s.shutdown()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from seekstack.dataframe import io, serialize
from seekstack.dataframe.execution import duck
from seekstack.dataframe.logical.nodes import Node, PythonNode, RepartitionNode, SqlNode, explain_tree

if TYPE_CHECKING:
    from seekstack.dataframe.session import Session


def _columns(arg, name: str) -> list[str]:
    cols = [arg] if isinstance(arg, str) else list(arg)
    if not cols or not all(isinstance(c, str) and c for c in cols):
        raise ValueError(f"{name}: expected a column name or a non-empty list of column names, got {arg!r}")
    return cols


class DataFrame:
    """A lazily evaluated, partitioned table (smallpond's DataFrame API)."""

    def __init__(self, session: Session, node: Node):
        self._session = session
        self._node = node

    @property
    def num_partitions(self) -> int:
        return self._node.num_partitions

    def _derive(self, node: Node) -> DataFrame:
        return DataFrame(self._session, node)

    def _sql(self, name: str, query: str) -> DataFrame:
        return self._derive(SqlNode(name, [self._node], query))

    def _python(self, name: str, fn, mode: str, batch_size: int = 122_880, schema=None) -> DataFrame:
        if schema is not None and not isinstance(schema, pa.Schema):
            raise ValueError(f"schema: expected a pyarrow.Schema, got {type(schema).__name__}")
        serialize.register_function(fn)
        return self._derive(PythonNode(name, [self._node], fn, mode, batch_size, schema))

    # -- partitioning --------------------------------------------------------------------------------------
    def repartition(
        self, npartitions: int, hash_by: str | list[str] | None = None, by: str | None = None, by_rows: bool = False
    ) -> DataFrame:
        """Redistribute into `npartitions` partitions.

        ``hash_by=cols`` puts equal keys in one partition; ``by=col`` takes the partition id from a column (values
        in ``[0, npartitions)``); otherwise files (or, with ``by_rows=True`` or too few files, rows) are spread
        evenly.

        >>> df.repartition(8, hash_by="user_id")  # doctest: +SKIP
        """
        if isinstance(npartitions, bool) or not isinstance(npartitions, int) or npartitions < 1:
            raise ValueError(f"npartitions must be a positive integer, got {npartitions!r}")
        if hash_by is not None and by is not None:
            raise ValueError("hash_by and by: give at most one of them")
        if hash_by is not None:
            node = RepartitionNode("repartition", [self._node], npartitions, "hash", _columns(hash_by, "hash_by"))
        elif by is not None:
            if not isinstance(by, str) or not by:
                raise ValueError(f"by: expected one column name, got {by!r}")
            node = RepartitionNode("repartition", [self._node], npartitions, "column", [by])
        else:
            node = RepartitionNode("repartition", [self._node], npartitions, "rows" if by_rows else "files")
        return self._derive(node)

    def random_shuffle(self) -> DataFrame:
        """Send every row to a random partition, then shuffle rows within each partition."""
        node = RepartitionNode("random_shuffle", [self._node], self.num_partitions, "random")
        return self._derive(node)._sql("shuffle_rows", "SELECT * FROM {0} ORDER BY random()")

    def partial_sort(self, by: str | list[str]) -> DataFrame:
        """Sort each partition by `by` (a global sort: `repartition(by=range bucket)` first)."""
        cols = ", ".join(duck.quote(c) for c in _columns(by, "by"))
        return self._sql("partial_sort", f"SELECT * FROM {{0}} ORDER BY {cols}")

    # -- row-wise ------------------------------------------------------------------------------------------
    def filter(self, sql_or_func) -> DataFrame:
        """Keep rows where the SQL condition (``"x > 1"``) holds, or where ``func(row_dict)`` is true."""
        if isinstance(sql_or_func, str):
            return self._sql("filter", f"SELECT * FROM {{0}} WHERE {sql_or_func}")
        if callable(sql_or_func):
            return self._python("filter", sql_or_func, "filter")
        raise ValueError(f"sql_or_func: expected a SQL string or a callable, got {type(sql_or_func).__name__}")

    def map(self, sql_or_func, schema: pa.Schema | None = None) -> DataFrame:
        """New columns from a SQL select list (``"a, b * 2 AS c"``), or ``func(row_dict) -> dict``."""
        if isinstance(sql_or_func, str):
            return self._sql("map", f"SELECT {sql_or_func} FROM {{0}}")
        if callable(sql_or_func):
            return self._python("map", sql_or_func, "map", schema=schema)
        raise ValueError(f"sql_or_func: expected a SQL string or a callable, got {type(sql_or_func).__name__}")

    def flat_map(self, sql_or_func, schema: pa.Schema | None = None) -> DataFrame:
        """Zero or more rows per row: a SQL select list (e.g. with ``unnest``), or ``func(row) -> list[dict]``."""
        if isinstance(sql_or_func, str):
            return self._sql("flat_map", f"SELECT {sql_or_func} FROM {{0}}")
        if callable(sql_or_func):
            return self._python("flat_map", sql_or_func, "flat_map", schema=schema)
        raise ValueError(f"sql_or_func: expected a SQL string or a callable, got {type(sql_or_func).__name__}")

    def map_batches(self, func, batch_size: int = 122_880, schema: pa.Schema | None = None) -> DataFrame:
        """``func(pyarrow.Table) -> Table | RecordBatch | dict | pandas.DataFrame`` on batches of up to
        `batch_size` rows."""
        if not callable(func):
            raise ValueError(f"func: expected a callable, got {type(func).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._python("map_batches", func, "map_batches", batch_size, schema)

    def limit(self, n: int) -> DataFrame:
        """At most `n` rows (any `n` of them), in one partition."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        per_part = self._sql("limit", f"SELECT * FROM {{0}} LIMIT {n}")
        merged = per_part._derive(RepartitionNode("merge", [per_part._node], 1, "files"))
        return merged._sql("limit", f"SELECT * FROM {{0}} LIMIT {n}")

    # -- actions -------------------------------------------------------------------------------------------
    def _partitions(self) -> list[list[str]]:
        return self._session._compute(self._node)

    def compute(self) -> DataFrame:
        """Run the plan now (results stay as checkpoints under the job's data root)."""
        self._partitions()
        return self

    def count(self) -> int:
        """Number of rows (read from the parquet footers of the result)."""
        return sum(io.parquet_metadata(f).num_rows for p in self._partitions() for f in p)

    def to_arrow(self) -> pa.Table:
        """The whole result as one arrow table, partitions in order."""
        files = duck.usable_files([f for p in self._partitions() for f in p])
        duck.check_same_schema(files, f"{self._node.label}: result")
        return io.read_parquet_table(files)

    def to_pandas(self):
        return self.to_arrow().to_pandas()

    def take(self, n: int) -> list[dict]:
        """Up to `n` rows as dicts."""
        return self.limit(n).take_all()

    def take_all(self) -> list[dict]:
        return self.to_arrow().to_pylist()

    def write_parquet(self, path: str) -> list[str]:
        """Write the result to directory `path` as ``part-PPPPP-K.parquet`` files (hard links to the task outputs
        when possible; each file appears atomically). Earlier ``part-*.parquet`` files there are removed."""
        if not isinstance(path, str) or not path:
            raise ValueError(f"path: expected a directory path, got {path!r}")
        parts = self._partitions()
        io.makedirs(path)
        for old in io.expand_paths_safe(io.join(path, "part-*.parquet")):
            io.remove_file(old)
        written = []
        for p, files in enumerate(parts):
            for k, src in enumerate(files):
                dst = io.join(path, f"part-{p:05d}-{k}.parquet")
                io.copy_file(src, dst)
                written.append(dst)
        return written

    def explain(self, show: bool = True) -> str:
        """The plan as written and after optimization (fused SQL, pruned columns)."""
        from seekstack.dataframe.logical.optimizer import optimize

        text = "logical plan:\n" + explain_tree(self._node) + "\noptimized plan:\n" + explain_tree(optimize(self._node))
        if show:
            print(text)
        return text

    def __repr__(self) -> str:
        return f"DataFrame({self._node.label}, {self.num_partitions} partition(s))"
