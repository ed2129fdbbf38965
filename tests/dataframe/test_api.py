"""Each API call against the same query in plain DuckDB or pandas, on the process-pool executor."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .conftest import random_frame


def sort_frame(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(sort_frame(got), sort_frame(want), check_dtype=False, rtol=1e-12)


def test_partial_sql_groupby_matches_duckdb(session, rng):
    pdf = random_frame(rng, 3001)
    df = session.from_pandas(pdf).repartition(5, hash_by="k")
    query = "SELECT k, sum(v) AS sv, count(*) AS c, max(w) AS mw FROM {0} GROUP BY k"
    got = session.partial_sql(query, df).to_pandas()
    want = duckdb.sql(query.format("pdf")).df()
    assert_same(got, want)
    assert got["c"].dtype == np.int64  # sum/count stay integers in parquet


def test_filter_map_flat_map_sql(session, rng):
    pdf = random_frame(rng, 1777)
    df = session.from_pandas(pdf).repartition(3, by_rows=True)
    got = df.filter("w > 0 AND g <> 'red'").map("k, w * 2 AS w2, upper(g) AS G").to_pandas()
    want = duckdb.sql("SELECT k, w * 2 AS w2, upper(g) AS G FROM pdf WHERE w > 0 AND g <> 'red'").df()
    assert_same(got, want)
    got = df.flat_map("k, unnest([w, w + 1]) AS x").to_pandas()
    want = duckdb.sql("SELECT k, unnest([w, w + 1]) AS x FROM pdf").df()
    assert_same(got, want)


def test_python_functions_match_pandas(session, rng):
    pdf = random_frame(rng, 999)
    df = session.from_pandas(pdf).repartition(4, hash_by="g")
    got = df.filter(lambda r: r["w"] % 3 == 0).to_pandas()
    assert_same(got, pdf[pdf.w % 3 == 0])
    got = df.map(lambda r: {"k": r["k"], "s": f"{r['g']}:{r['w']}"}).to_pandas()
    assert_same(got, pd.DataFrame({"k": pdf.k, "s": pdf.g + ":" + pdf.w.astype(str)}))
    got = df.flat_map(lambda r: [{"k": r["k"]}] * (r["k"] % 3)).to_pandas()
    assert_same(got, pd.DataFrame({"k": np.repeat(pdf.k.to_numpy(), pdf.k.to_numpy() % 3)}))


def test_map_batches_batch_size(session, rng):
    pdf = random_frame(rng, 1000)
    df = session.from_pandas(pdf)

    def summarize(table: pa.Table) -> pa.Table:
        return pa.table({"n": [table.num_rows], "total": [pa.compute.sum(table["w"]).as_py()]})

    got = df.map_batches(summarize, batch_size=128).to_pandas()
    assert sorted(got["n"]) == sorted([128] * 7 + [104])
    assert got["total"].sum() == pdf.w.sum()
    got = df.map_batches(lambda t: t.to_pandas().assign(v2=lambda d: d.v * 2), batch_size=300).to_pandas()
    assert_same(got, pdf.assign(v2=pdf.v * 2))


def test_partial_sort_limit_take_count(session, rng):
    pdf = random_frame(rng, 2500)
    df = session.from_pandas(pdf).repartition(4, hash_by="k")
    parts = df.partial_sort(["k", "w"])
    assert parts.count() == len(pdf)
    table = parts.to_arrow()
    assert sort_frame(table.to_pandas()).equals(sort_frame(pdf))
    # every partition is sorted by (k, w): check through the partition files
    for files in parts._partitions():
        t = pq.read_table(files[0]).to_pandas()
        assert t[["k", "w"]].equals(t[["k", "w"]].sort_values(["k", "w"]).reset_index(drop=True))
    assert df.limit(17).count() == 17
    assert df.limit(0).count() == 0
    rows = df.take(5)
    assert len(rows) == 5 and set(rows[0]) == {"k", "g", "v", "w"}
    assert df.limit(10**6).count() == len(pdf)


def test_random_shuffle_keeps_rows(session, rng):
    pdf = random_frame(rng, 800)
    df = session.from_pandas(pdf).repartition(3, by_rows=True).random_shuffle()
    assert df.num_partitions == 3
    assert_same(df.to_pandas(), pdf)


def test_join_of_copartitioned_inputs(session, rng):
    left = pd.DataFrame({"id": rng.permutation(500), "a": rng.normal(size=500)})
    right = pd.DataFrame({"id": rng.integers(0, 700, 400), "b": rng.integers(0, 9, 400)})
    l_df = session.from_pandas(left).repartition(4, hash_by="id")
    r_df = session.from_pandas(right).repartition(4, hash_by="id")
    query = "SELECT {0}.id, a, b FROM {0} JOIN {1} ON {0}.id = {1}.id"
    got = session.partial_sql(query, l_df, r_df).to_pandas()
    want = duckdb.sql(
        "SELECT l.id, a, b FROM left_ l JOIN right_ r ON l.id = r.id", connection=_con(left_=left, right_=right)
    ).df()
    assert_same(got, want)


def _con(**frames):
    con = duckdb.connect()
    for name, frame in frames.items():
        con.register(name, frame)
    return con


def test_readers_and_write_parquet(session, rng, tmp_path):
    pdf = random_frame(rng, 600)
    src = tmp_path / "in"
    src.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(pdf)), 3)):
        pdf.iloc[chunk].to_parquet(src / f"f{i}.parquet", index=False)
    pdf.to_csv(tmp_path / "x.csv", index=False)
    pdf.to_json(tmp_path / "x.json", orient="records", lines=True)

    df = session.read_parquet(str(src / "*.parquet"))
    assert_same(df.to_pandas(), pdf)
    assert df.repartition(3).num_partitions == 3
    assert_same(df.repartition(3).to_pandas(), pdf)
    assert_same(session.read_parquet(str(src), columns=["k", "w"]).to_pandas(), pdf[["k", "w"]])
    assert_same(session.read_csv(str(tmp_path / "x.csv")).to_pandas(), pdf)
    got = session.read_json(str(tmp_path / "x.json")).to_pandas()
    assert_same(got, duckdb.sql(f"SELECT * FROM read_json('{tmp_path / 'x.json'}')").df())
    assert_same(got[["k", "g", "w"]], pdf[["k", "g", "w"]])

    out = tmp_path / "out"
    written = df.repartition(2, hash_by="g").filter("v > 0").write_parquet(str(out))
    assert len(written) == 2 and all(p.split("/")[-1].startswith("part-0000") for p in written)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert_same(pd.read_parquet(out), pdf[pdf.v > 0])


def test_from_items_and_arrow(session):
    assert session.from_items([1, 2, 3]).take_all() == [{"item": 1}, {"item": 2}, {"item": 3}]
    t = pa.table({"x": pa.array([1.5, None, 3.0]), "s": ["a", "b", None]})
    assert session.from_arrow(t).to_arrow().equals(t)


def test_explain_lists_steps(session):
    df = session.from_items([{"x": i} for i in range(5)]).filter("x > 1").map("x * 2 AS y")
    text = df.explain(show=False)
    assert "filter#" in text and "map#" in text and "optimized plan" in text
    with pytest.raises(ValueError, match="npartitions"):
        df.repartition(0)
