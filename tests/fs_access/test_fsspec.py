"""The `3fs://` fsspec filesystem with the real libraries: pandas, pyarrow, duckdb and polars read and write
cluster files; results are compared with the same frames handled in memory."""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pytest

import seekstack.fs.fsspec_fs  # noqa: F401  (registers 3fs:// and hf3fs://)
from seekstack.fs.fsspec_fs import SeekstackFileSystem


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(1234)
    n = 20_011
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": rng.standard_normal(n),
            "tag": rng.choice(["a", "b", "c", "d"], n),
        }
    )


@pytest.fixture
def fsx(cluster):
    fs = fsspec.filesystem("3fs", data=str(cluster.dir))
    return fs


def test_registered_and_paths(cluster, fsx):
    assert isinstance(fsspec.filesystem("hf3fs", data=str(cluster.dir)), SeekstackFileSystem)
    assert SeekstackFileSystem._strip_protocol("3fs://a/b/") == "/a/b"
    assert SeekstackFileSystem._strip_protocol("3fs:///a/b") == "/a/b"
    assert fsx.info("/")["type"] == "directory"


def test_namespace_operations(fsx, uniq):
    d = uniq + "_ns"
    fsx.makedirs(d + "/sub", exist_ok=True)
    fsx.pipe_file(d + "/a.bin", b"0123456789")
    assert fsx.cat_file("3fs://" + d + "/a.bin", start=2, end=5) == b"234"
    assert sorted(fsx.ls(d, detail=False)) == [d + "/a.bin", d + "/sub"]
    assert fsx.info(d + "/a.bin")["size"] == 10 and fsx.isdir(d + "/sub")
    fsx.mv(d + "/a.bin", d + "/sub/b.bin")
    fsx.cp_file(d + "/sub/b.bin", d + "/c.bin")
    with fsx.open(d + "/c.bin", "ab") as f:
        f.write(b"AB")
    assert fsx.cat_file(d + "/c.bin") == b"0123456789AB"
    assert fsx.find(d) == [d + "/c.bin", d + "/sub/b.bin"]
    with pytest.raises(FileNotFoundError):
        fsx.info(d + "/a.bin")
    fsx.rm(d, recursive=True)
    assert not fsx.exists(d)


def test_pandas_csv_and_parquet(cluster, fsx, frame, uniq):
    opts = {"data": str(cluster.dir)}
    url = f"hf3fs://{uniq}_pd"
    frame.to_csv(url + ".csv", index=False, storage_options=opts)
    pd.testing.assert_frame_equal(pd.read_csv(url + ".csv", storage_options=opts), frame)
    frame.to_parquet(url + ".parquet", storage_options=opts)
    pd.testing.assert_frame_equal(pd.read_parquet(url + ".parquet", storage_options=opts), frame)
    with fsx.open(f"3fs://{uniq}_pd.csv") as f:  # the 3fs:// spelling through an open file
        pd.testing.assert_frame_equal(pd.read_csv(f), frame)


def test_pyarrow_dataset(fsx, frame, uniq):
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    d = uniq + "_pa"
    fsx.makedirs(d, exist_ok=True)
    pq.write_table(table.slice(0, 7000), d + "/part-0.parquet", filesystem=fsx, row_group_size=1000)
    pq.write_table(table.slice(7000), d + "/part-1.parquet", filesystem=fsx, row_group_size=1000)
    back = ds.dataset(d, filesystem=fsx, format="parquet").to_table()
    assert back.sort_by("id").equals(table)
    part = pq.read_table(d + "/part-1.parquet", filesystem=fsx, columns=["x"], filters=[("id", "<", 8000)])
    np.testing.assert_array_equal(part.column("x").to_numpy(), frame["x"].to_numpy()[7000:8000])


def test_duckdb_reads_and_writes(fsx, frame, uniq):
    import duckdb

    con = duckdb.connect()
    con.register_filesystem(fsx)
    frame.to_parquet(f"hf3fs://{uniq}_dd.parquet", storage_options={"client": fsx.client})
    got = con.sql(f"select tag, count(*) n, sum(x) s from '3fs://{uniq}_dd.parquet' group by tag order by tag").df()
    want = frame.groupby("tag").agg(n=("x", "size"), s=("x", "sum")).reset_index()
    np.testing.assert_array_equal(got["n"].to_numpy(), want["n"].to_numpy())
    np.testing.assert_allclose(got["s"].to_numpy(), want["s"].to_numpy(), rtol=1e-12)
    con.sql(f"copy (select id * 2 as y from '3fs://{uniq}_dd.parquet' where id % 3 = 0) to '3fs://{uniq}_dd2.parquet'")
    y = pd.read_parquet(f"{uniq}_dd2.parquet", filesystem=fsx)["y"].to_numpy()
    np.testing.assert_array_equal(np.sort(y), frame["id"].to_numpy()[::3] * 2)
    con.close()


def test_polars_reads_and_writes(fsx, frame, uniq):
    import polars as pl

    df = pl.from_pandas(frame)
    # polars does not hand unknown URL schemes to fsspec, so it gets fsspec file objects
    with fsx.open(uniq + "_pl.parquet", "wb") as f:
        df.write_parquet(f)
    with fsx.open(uniq + "_pl.parquet", "rb") as f:
        assert pl.read_parquet(f).equals(df)
    with fsx.open(uniq + "_pl.csv", "wb") as f:
        df.write_csv(f)
    with fsx.open(uniq + "_pl.csv", "rb") as f:
        back = pl.read_csv(f)
    assert back["id"].equals(df["id"]) and back["tag"].equals(df["tag"])
    np.testing.assert_allclose(back["x"].to_numpy(), df["x"].to_numpy(), rtol=1e-15)


@pytest.mark.parametrize("stop_cluster_first", [False, True])
def test_unclosed_file_does_not_hang_interpreter_exit(tmp_path, stop_cluster_first):
    # DuckDB's fsspec bridge and pyarrow leave files to the garbage collector; at interpreter shutdown no thread can
    # be started, so the finalizer must not try to close on one.
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import fsspec
        from seekstack.fs.cluster import Cluster
        import seekstack.fs.fsspec_fs  # registers 3fs://
        cluster = Cluster({str(tmp_path / "c")!r}, storage_nodes=1, replicas=1)
        cluster.start()
        fs = fsspec.filesystem("3fs", data=str(cluster.dir))
        with fs.open("/a", "wb") as f:
            f.write(b"abc")
        leaked = fs.open("/a", "rb")
        assert leaked.read(1) == b"a"
        if {stop_cluster_first!r}:
            cluster.stop()
        print("done", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done" in proc.stdout
