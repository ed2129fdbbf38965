"""The demo stage's output against the same filter + dedup done by plain DuckDB on the same generated documents."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq

from seekstack.dataframe.demo import make_documents, run_demo


def test_demo_matches_plain_duckdb(tmp_path):
    summary = run_demo(tmp_path)

    docs = make_documents(4000)  # the demo's documents: the generator is seeded
    con = duckdb.connect(":memory:", config={"threads": 1})
    con.register("docs", docs)
    want = con.execute(
        "SELECT min(doc_id) AS doc_id, tokens, len(tokens) AS num_tokens FROM docs WHERE quality >= 0.2 "
        "GROUP BY tokens ORDER BY doc_id"
    ).fetchall()
    con.close()

    files = sorted((tmp_path / "tokens").glob("*.parquet"))
    assert len(files) == 4
    got = []
    for f in files:
        rows = pq.read_table(f).to_pylist()
        ids = [r["doc_id"] for r in rows]
        assert ids == sorted(ids)  # partial_sort("doc_id") within each file
        got += [(r["doc_id"], r["tokens"], r["num_tokens"]) for r in rows]
    assert sorted(got) == [(d, list(t), n) for d, t, n in want]
    assert len({tuple(t) for _, t, _ in got}) == len(got)  # exact duplicates removed across partitions

    assert summary["documents"].startswith(f"4000 in, {len(want)} kept")
    assert summary["tokens"].startswith(f"{sum(n for _, _, n in want)} tokens in 4 parquet files")
