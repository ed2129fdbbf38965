"""Repartition invariants: every row lands exactly once; hash_by puts equal keys together; by= obeys the column."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

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
