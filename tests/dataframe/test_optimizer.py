"""The optimizer: consecutive SQL steps fuse into one query; repartitions write only the columns used later."""

from __future__ import annotations

from seekstack.dataframe.logical.nodes import RepartitionNode, SqlNode, walk
from seekstack.dataframe.logical.optimizer import optimize, referenced_columns


def test_consecutive_sql_fuses_into_one_step(inline):
    df = inline.from_items([{"a": i, "b": -i, "c": str(i)} for i in range(50)])
    df = df.filter("a % 2 = 0").map("a, b * 10 AS b10").filter("b10 < -100")
    plan = optimize(df._node)
    sql_nodes = [n for n in walk(plan) if isinstance(n, SqlNode)]
    assert len(sql_nodes) == 1 and len(sql_nodes[0].fused) == 3
    assert sorted(r["a"] for r in df.take_all()) == [a for a in range(12, 50, 2)]
    assert inline.last_stats["tasks_run"] == 1  # one DuckDB pass for three steps


def test_sort_is_not_fused_under_another_query(inline):
    df = inline.from_items([{"a": i} for i in range(20)]).partial_sort("a").filter("a > 3")
    sql_nodes = [n for n in walk(optimize(df._node)) if isinstance(n, SqlNode)]
    assert len(sql_nodes) == 2


def test_repartition_prunes_unused_columns(inline):
    df = inline.from_items([{"k": i % 4, "v": float(i), "junk": "x" * 10, "more": i} for i in range(40)])
    out = inline.partial_sql("SELECT k, sum(v) AS s FROM {0} GROUP BY k", df.repartition(2, hash_by="k"))
    (rep,) = [n for n in walk(optimize(out._node)) if isinstance(n, RepartitionNode)]
    assert rep.columns == ["k", "v"]
    assert "columns=['k', 'v']" in out.explain(show=False)
    assert sorted((r["k"], r["s"]) for r in out.take_all()) == [
        (k, float(sum(i for i in range(40) if i % 4 == k))) for k in range(4)
    ]
    # a star or a Python step keeps everything
    star = df.repartition(2, hash_by="k").filter("v > 3")
    (rep,) = [n for n in walk(optimize(star._node)) if isinstance(n, RepartitionNode)]
    assert rep.columns is None
    assert optimize(out._node, prune=False) is not None


def test_referenced_columns():
    assert referenced_columns("SELECT count(*), a FROM {0}", ["a", "b", "ab"]) == {"a"}
    assert referenced_columns("SELECT * FROM {0}", ["a"]) is None
    assert referenced_columns('SELECT "A b" FROM {0}', ["A b", "b"]) == {"A b", "b"}  # over-approximates
