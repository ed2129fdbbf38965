"""seekstack.dataframe: smallpond's DataFrame API on DuckDB, over a local directory or an fsspec file system such as
a seekstack.fs cluster (``3fs://`` paths; see `init`'s ``storage_options``).

Data is split into partitions of parquet files; each task runs DuckDB (or a Python function) on one partition in
a fresh connection and commits its output atomically. Tasks run on a local process pool or on Ray.

>>> import tempfile, seekstack.dataframe as sp
>>> s = sp.init(data_root=tempfile.mkdtemp(), num_executors=0)
>>> df = s.from_items([{"ticker": t, "price": p} for t, p in [("A", 1.0), ("B", 2.0), ("A", 3.0)]])
>>> df = df.repartition(2, hash_by="ticker")
>>> out = s.partial_sql("SELECT ticker, max(price) AS hi FROM {0} GROUP BY ticker", df)
>>> sorted((r["ticker"], r["hi"]) for r in out.take_all())
[('A', 3.0), ('B', 2.0)]
>>> s.shutdown()
"""

from seekstack.dataframe.dataframe import DataFrame
from seekstack.dataframe.errors import InjectedFault, SchemaMismatchError, StepError
from seekstack.dataframe.session import Session, init

__all__ = ["DataFrame", "InjectedFault", "SchemaMismatchError", "Session", "StepError", "init"]
