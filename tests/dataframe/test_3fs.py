"""The dataframe layer on `3fs://` paths: one real local seekstack.fs cluster (mgmtd + meta + storage processes on
127.0.0.1) for the module, a session whose data_root is on it and whose spawned workers connect to it, and the same
pipeline on a local directory, both checked against plain DuckDB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import seekstack.dataframe as sp
from seekstack.dataframe import io
from seekstack.dataframe.sort import checksum, generate
from seekstack.dataframe.sort.pipeline import generate_input, sort_records, validate_partitions

from .conftest import random_frame

local_cluster = pytest.importorskip("seekstack.fs.testing").local_cluster
CHUNK = 64 << 10  # small chunks, so even the test's files span several chunks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(
        tmp_path_factory.mktemp("df3fs") / "cluster", storage_nodes=2, replicas=2, chunk_size=CHUNK
    ) as c:
        yield c


@pytest.fixture(scope="module")
def options(cluster):
    return {"3fs": {"data": str(cluster.dir)}}


@pytest.fixture(scope="module")
def fs3(options):
    io.configure(options)
    return io.filesystem("3fs://")


@pytest.fixture(scope="module")
def s3fs(cluster, options):
    """Tasks run on 2 spawned workers, which reach the cluster through the session's storage options."""
    s = sp.init(data_root="3fs:///sp", num_executors=2, task_memory="512MB", storage_options=options)
    yield s
    s.shutdown()


@pytest.fixture
def uniq(request):
    return "3fs:///t/" + request.node.name.replace("[", "_").replace("]", "")


def _write_inputs(frames: list[pd.DataFrame], local_dir: Path, remote_dir: str) -> None:
    local_dir.mkdir(parents=True)
    for i, df in enumerate(frames):
        table = pa.Table.from_pandas(df, preserve_index=False)
        pq.write_table(table, local_dir / f"in-{i}.parquet")
        w = io.parquet_writer(io.join(remote_dir, f"in-{i}.parquet"), table.schema)
        w.write_table(table)
        w.close()


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_pipeline_on_3fs_matches_local_and_duckdb(s3fs, fs3, uniq, tmp_path, rng):
    frames = [random_frame(rng, n) for n in (1201, 3, 777)]
    local_in = tmp_path / "in"
    io.makedirs(uniq + "/in")
    _write_inputs(frames, local_in, uniq + "/in")
    query = "SELECT k, g, count(*) AS n, sum(w) AS sw, sum(v) AS sv FROM {0} GROUP BY k, g"

    def pipeline(session, src: str, out: str) -> list[str]:
        df = session.read_parquet(src).repartition(5, hash_by="k")
        return session.partial_sql(query, df).write_parquet(out)

    remote_files = pipeline(s3fs, uniq + "/in/*.parquet", uniq + "/out")
    assert all(f.startswith("3fs://") for f in remote_files) and len(remote_files) == 5
    with sp.init(data_root=str(tmp_path / "root"), num_executors=0, task_memory="512MB") as local:
        local_files = pipeline(local, str(local_in / "*.parquet"), str(tmp_path / "out"))

    remote = io.read_parquet_table(io.expand_paths(uniq + "/out")).to_pandas()
    local_df = pd.concat([pq.read_table(f).to_pandas() for f in local_files])
    ref = duckdb.sql(query.format(f"read_parquet('{local_in}/*.parquet')")).df()
    pd.testing.assert_frame_equal(_sorted(remote), _sorted(local_df), check_dtype=False)
    pd.testing.assert_frame_equal(_sorted(remote), _sorted(ref), check_dtype=False, rtol=1e-9)
    # hash_by put each key into exactly one partition
    keys = [set(io.read_parquet_table([f])["k"].to_pylist()) for f in remote_files]
    assert sum(len(k) for k in keys) == len(set().union(*keys))
    # every task committed a manifest, and no temporary name survived a commit
    names = fs3.find(s3fs.tasks_dir)
    manifests = [io.read_json("3fs://" + n) for n in names if n.endswith("/_SUCCESS.json")]
    assert manifests and {int(m["worker"].rsplit(":", 1)[1]) for m in manifests} - {os.getpid()}  # ran in workers
    assert not [n for n in names + fs3.find(uniq) if "/.tmp-" in n or "/.staging" in n]


def test_csv_json_globs_and_mixed_storage(s3fs, fs3, uniq, tmp_path, rng):
    df = random_frame(rng, 301)
    fs3.makedirs(uniq[len("3fs://") :], exist_ok=True)
    for i, part in enumerate([df.iloc[:100], df.iloc[100:101], df.iloc[101:]]):
        with fs3.open(f"{uniq}/p{i}.csv", "wb") as f:
            f.write(part.to_csv(index=False).encode())
        with fs3.open(f"{uniq}/p{i}.json", "wb") as f:
            f.write(part.to_json(orient="records", lines=True).encode())
    ref = duckdb.sql("SELECT g, count(*) AS n, sum(w) AS sw FROM df GROUP BY g").df()
    agg = "SELECT g, count(*) AS n, sum(w) AS sw FROM {0} GROUP BY g"
    csv = s3fs.partial_sql(agg, s3fs.read_csv(uniq + "/p*.csv")).to_pandas()
    # hf3fs:// is the same file system (pandas needs a scheme that starts with a letter)
    js = s3fs.partial_sql(agg, s3fs.read_json("hf3fs://" + uniq[len("3fs://") :] + "/*.json")).to_pandas()
    pd.testing.assert_frame_equal(_sorted(csv), _sorted(ref), check_dtype=False)
    pd.testing.assert_frame_equal(_sorted(js), _sorted(ref), check_dtype=False)
    # a 3fs job writing to a local directory, and reading it back from there
    out = s3fs.from_pandas(df).repartition(2, by_rows=True).write_parquet(str(tmp_path / "o"))
    back = s3fs.read_parquet(str(tmp_path / "o")).to_pandas()
    assert len(out) == 2 and all(not f.startswith("3fs") for f in out)
    pd.testing.assert_frame_equal(_sorted(back), _sorted(df), check_dtype=False)
    with pytest.raises(FileNotFoundError, match="no input files"):
        s3fs.read_parquet(uniq + "/missing/*.parquet")


def test_checkpointed_rerun_on_3fs_skips_finished_tasks(cluster, options, uniq, rng):
    df = random_frame(rng, 500)

    def run(session):
        data = session.from_pandas(df).repartition(3, hash_by="g")
        return session.partial_sql("SELECT g, sum(w) AS sw FROM {0} GROUP BY g", data).to_pandas()

    root = uniq + "/root"
    with sp.init(job_id="ckpt", data_root=root, num_executors=0, storage_options=options) as first:
        got = run(first)
        ran = first.last_stats["tasks_run"]
    # the manifest is JSON on the cluster, naming committed 3fs:// files
    manifests = [n for n in io.filesystem(root).find(root) if n.endswith("_SUCCESS.json")]
    assert len(manifests) == ran > 0
    outputs = io.read_json("3fs://" + manifests[0])["outputs"]
    assert outputs and all(io.exists(f) for part in outputs for f in part)
    with sp.init(job_id="ckpt", data_root=root, num_executors=0, storage_options=options) as again:
        assert_same = run(again)
        assert again.last_stats["tasks_run"] == 0 and again.last_stats["tasks_skipped"] == ran
    pd.testing.assert_frame_equal(_sorted(assert_same), _sorted(got))
    ref = df.groupby("g", as_index=False)["w"].sum().rename(columns={"w": "sw"})
    pd.testing.assert_frame_equal(_sorted(got), _sorted(ref), check_dtype=False)


def test_killed_workers_leave_no_corrupt_output_on_3fs(options, uniq, rng):
    """Workers die (os._exit) after writing but before committing; retries on fresh workers finish the job, and
    only committed files are read."""
    df = random_frame(rng, 400)
    # fault_inject_prob=1.0 kills every attempt but the last (attempts 0 and 1 of each task here): a fixed schedule.
    # With a probability below 1 the draws hash the task keys, which name this run's random job id and data, so
    # whether anything was killed at all was left to chance (0.5 over 5 tasks: no fault in 1 run of 32).
    with sp.init(
        data_root=uniq,
        num_executors=1,
        storage_options=options,
        fault_inject_prob=1.0,
        fault_inject_kill=True,
        max_retries=2,
    ) as s:
        got = s.partial_sql(
            "SELECT k, count(*) AS n FROM {0} GROUP BY k", s.from_pandas(df).repartition(4, hash_by="k")
        )
        got = got.to_pandas()
        assert s.last_stats["attempts_failed"] > 0
        names = io.filesystem(uniq).find(s.job_dir)
    ref = df.groupby("k", as_index=False).size().rename(columns={"size": "n"})
    pd.testing.assert_frame_equal(_sorted(got), _sorted(ref), check_dtype=False)
    # the killed attempts' files were wiped by their retries, not left beside the committed ones
    assert not [n for n in names if "/.tmp-" in n or "/.staging" in n]


def test_graysort_small_on_3fs(s3fs):
    records = 5_003
    out = sort_records(generate_input(s3fs, records, 2, 4, seed=5), 4)
    summary = validate_partitions(out._partitions())
    assert all(f.startswith("3fs://") for part in out._partitions() for f in part)
    assert summary.ordered and summary.records == records and summary.checksum == checksum(generate(0, records, 5))


def test_storage_options_are_checked(tmp_path, options):
    with pytest.raises(ValueError, match="storage_options"):
        sp.init(data_root=str(tmp_path), num_executors=0, storage_options={"3fs": "/tmp/x"})
    with pytest.raises(ValueError, match="storage_options"):
        sp.init(data_root=str(tmp_path), num_executors=0, storage_options={"3fs": {"client": object()}})
    # SP_STORAGE_OPTIONS (JSON) is read when the argument is absent
    os.environ["SP_STORAGE_OPTIONS"] = json.dumps(options)
    try:
        s = sp.init(data_root="3fs:///env-root", num_executors=0)
    finally:
        del os.environ["SP_STORAGE_OPTIONS"]
    assert s.storage_options == options and io.exists("3fs:///env-root/" + s.job_id + "/tasks")
    s.shutdown()
