"""Repartition invariants: every row lands exactly once; hash_by puts equal keys together; by= obeys the column."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from seekstack.dataframe.logical.nodes import RepartitionNode, walk
from seekstack.dataframe.logical.optimizer import optimize

from .conftest import random_frame


def partition_frames(df) -> list[pd.DataFrame]:
    return [pd.concat([pq.read_table(f).to_pandas() for f in files]) for files in df._partitions()]


def row_multiset(frame: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, frame.itertuples(index=False)))


@pytest.mark.parametrize("n", [1, 3, 7])
def test_hash_by_every_row_once_and_keys_together(session, rng, n):
    pdf = random_frame(rng, 1234)
    df = session.from_pandas(pdf).repartition(2, by_rows=True).repartition(n, hash_by=["k", "g"])
    parts = partition_frames(df)
    assert len(parts) == n
    assert row_multiset(pd.concat(parts)) == row_multiset(pdf)
    owners: dict[tuple, int] = {}
    for p, frame in enumerate(parts):
        for key in set(zip(frame.k, frame.g, strict=True)):
            assert owners.setdefault(key, p) == p, f"key {key} in partitions {owners[key]} and {p}"


def test_by_column_and_rows(session, rng):
    pdf = random_frame(rng, 700).assign(bucket=lambda d: d.k % 5)
    parts = partition_frames(session.from_pandas(pdf).repartition(5, by="bucket"))
    for p, frame in enumerate(parts):
        assert set(frame.bucket) <= {p}
    assert row_multiset(pd.concat(parts)) == row_multiset(pdf)
    parts = partition_frames(session.from_pandas(pdf).repartition(6, by_rows=True))
    sizes = [len(f) for f in parts]
    assert sum(sizes) == len(pdf) and max(sizes) - min(sizes) <= 1
    assert row_multiset(pd.concat(parts)) == row_multiset(pdf)


def test_more_partitions_than_rows_leaves_typed_empty_partitions(session):
    df = session.from_items([{"x": 1, "s": "a"}, {"x": 2, "s": "b"}]).repartition(5, hash_by="x")
    parts = df._partitions()
    assert len(parts) == 5
    assert all(pq.read_schema(f).names == ["x", "s"] for files in parts for f in files)
    assert sorted(r["x"] for r in df.map("x + 1 AS x").take_all()) == [2, 3]


def test_by_column_arrow_engine_matches_duckdb_engine(session, rng):
    """Integer ids take the Arrow shuffle; the same ids as text take DuckDB's COPY PARTITION_BY. Both must route
    every row to the partition its column names, and columns no later step reads are not written."""
    pdf = random_frame(rng, 901).assign(pid=lambda d: rng.integers(0, 4, len(d)), row=lambda d: range(len(d)))
    src = session.from_pandas(pdf).repartition(3, by_rows=True)
    arrow_parts = partition_frames(src.repartition(4, by="pid"))
    text = src.map("* REPLACE (CAST(pid AS VARCHAR) AS pid)")
    duck_parts = partition_frames(text.repartition(4, by="pid"))
    for p, (a, d) in enumerate(zip(arrow_parts, duck_parts, strict=True)):
        assert set(a.pid) <= {p} and set(d.pid.astype(int)) <= {p}
        assert sorted(a.row) == sorted(d.row) == sorted(pdf.row[pdf.pid == p])
    assert row_multiset(pd.concat(arrow_parts)) == row_multiset(pdf)
    pruned = session.partial_sql("SELECT row, v FROM {0}", src.repartition(4, by="pid"))
    (rep,) = [n for n in walk(optimize(pruned._node)) if isinstance(n, RepartitionNode) and n.mode == "column"]
    assert rep.columns == ["v", "row"]  # pid routes the rows but no later step reads it, so it is not written
    assert sorted(pruned.to_pandas().row) == sorted(pdf.row)


def test_by_column_null_or_out_of_range_ids_fail(inline):
    from seekstack.dataframe.errors import StepError

    for bad in ([0, None, 1], [0, -1, 1]):
        df = inline.from_items([{"pid": x, "v": i} for i, x in enumerate(bad)])
        with pytest.raises(StepError, match=r"repartition#\d+, partition 0: ValueError: by: .*ids in \[0, 2\)"):
            df.repartition(2, by="pid").count()
