"""The Ray executor, on one module-scoped local Ray bound to 127.0.0.1 (one init for the module)."""

from __future__ import annotations

import os
import shutil
import tempfile

import duckdb
import pytest

import seekstack.dataframe as sp
from seekstack.dataframe.execution.ray_executor import start_ray

from .conftest import random_frame

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    temp_dir = tempfile.mkdtemp(prefix="sray-", dir="/tmp")
    assert start_ray("local", num_cpus=2, temp_dir=temp_dir)
    s = sp.init(data_root=str(tmp_path_factory.mktemp("ray")), ray_address="local", num_executors=2)
    yield s
    s.shutdown()
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_is_loopback_only(ray_session):
    ray_session.from_items([{"a": 1}]).count()
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_ray_pipeline_matches_duckdb(ray_session, rng):
    pdf = random_frame(rng, 2000)
    df = ray_session.from_pandas(pdf).repartition(4, hash_by="k").filter(lambda r: r["w"] > -500)
    query = "SELECT k, count(*) AS c, sum(w) AS s FROM {0} GROUP BY k"
    got = sorted(tuple(r.values()) for r in ray_session.partial_sql(query, df).take_all())
    want = sorted(duckdb.sql("SELECT k, count(*) AS c, sum(w) AS s FROM pdf WHERE w > -500 GROUP BY k").fetchall())
    assert got == want


def test_ray_retries_injected_faults(ray_session, rng):
    pdf = random_frame(rng, 300)
    ray_session.fault_inject_prob, ray_session.max_retries = 1.0, 1  # 1.0: attempt 0 of every task fails
    ray_session._executor = None  # the executor takes the settings when it is created
    try:
        got = ray_session.from_pandas(pdf).repartition(3, hash_by="g").map("g, w + 1 AS w1").to_pandas()
        assert ray_session.last_stats["attempts_failed"] > 0
    finally:
        ray_session.fault_inject_prob, ray_session._executor = 0.0, None
    assert sorted(got.w1) == sorted(pdf.w + 1)


def test_ray_tasks_reach_a_3fs_data_root(ray_session, tmp_path, rng):
    """Ray workers get the session's storage options with their settings and connect to the cluster themselves."""
    from seekstack.dataframe import io
    from seekstack.fs.cluster import Cluster

    pdf = random_frame(rng, 700)
    with Cluster(tmp_path / "cluster", storage_nodes=1, replicas=1) as cluster:
        options = {"3fs": {"data": str(cluster.dir)}}
        with sp.init(data_root="3fs:///ray", ray_address="local", storage_options=options) as s:
            df = s.from_pandas(pdf).repartition(3, hash_by="g")
            got = s.partial_sql("SELECT g, sum(w) AS s FROM {0} GROUP BY g", df).take_all()
            manifests = [f for f in io.filesystem(s.tasks_dir).find(s.tasks_dir) if f.endswith("_SUCCESS.json")]
            workers = {io.read_json("3fs://" + m)["worker"] for m in manifests}
    assert sorted((r["g"], r["s"]) for r in got) == sorted(pdf.groupby("g")["w"].sum().items())
    assert manifests and not any(w.endswith(f":{os.getpid()}") for w in workers)
