"""`seekstack bench sort [--size 256MB] [--executors N] [--ray]`: GraySort on the dataframe layer next to one
DuckDB ``ORDER BY`` and Polars' sort of the same generated data, all validated (order, count, checksum).

Every figure is relative to the single-process DuckDB sort measured in the same run (target: within 1.5x).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
import uuid

from seekstack.dataframe.sort.gensort import RECORD_BYTES

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"size: expected e.g. 256MB or 1GB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import seekstack.dataframe as sp
    from seekstack.bench import Report
    from seekstack.dataframe.sort.pipeline import generate_input, sort_records, validate_partitions

    p = argparse.ArgumentParser(prog="seekstack bench sort", description=__doc__)
    p.add_argument("--size", default="256MB", help="data size (records of 100 bytes), e.g. 256MB, 1GB")
    p.add_argument("--executors", type=int, default=os.cpu_count() or 1, help="process-pool workers")
    p.add_argument("--partitions", type=int, default=0, help="sort partitions (power of two; 0: auto)")
    p.add_argument("--ray", action="store_true", help="also run on a local Ray (127.0.0.1)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    records = max(1, size // RECORD_BYTES)
    nbytes = records * RECORD_BYTES
    n_out = args.partitions or 1 << max(1, (max(1, nbytes // (32 << 20))).bit_length())
    n_in = max(2, args.executors)
    workdir = args.workdir or tempfile.mkdtemp(prefix="seekstack-sort-")
    threads = os.cpu_count() or 1
    report = Report("sort", ["case", "seconds", "MB/s", "x DuckDB time", "valid"])
    report.params.update(
        size=nbytes,
        records=records,
        executors=args.executors,
        sort_partitions=n_out,
        data_partitions=n_in,
        threads=threads,
    )
    try:
        with sp.init(data_root=os.path.join(workdir, "root"), num_executors=args.executors) as s:
            data = generate_input(s, records, n_in, n_out)
            t_gen = _timed(data.compute)
            gen_files = [f for part in data._partitions() for f in part]
            expected = validate_partitions([[f] for f in gen_files])

            def ours(session):
                sorted_df = sort_records(session.read_parquet(gen_files), n_out)
                t = _timed(sorted_df.compute)
                return t, validate_partitions(sorted_df._partitions())

            cases = [(f"seekstack.dataframe ({args.executors} executors)", *ours(s))]
        if args.ray:
            from seekstack.dataframe.execution.ray_executor import start_ray

            start_ray("local", args.executors)  # started outside the timing: Ray init is a one-off ~6 s
            with sp.init(
                data_root=os.path.join(workdir, "root"),
                num_executors=args.executors,
                ray_address="local",
                job_id="ray-" + uuid.uuid4().hex[:6],
            ) as rs:
                cases.append((f"seekstack.dataframe on Ray ({args.executors} CPUs)", *ours(rs)))
            import ray

            ray.shutdown()

        cases.append(("DuckDB ORDER BY (1 process)", *_duckdb_sort(gen_files, workdir, threads)))
        cases.append(("Polars sort (1 process)", *_polars_sort(gen_files, workdir)))
        base = next(t for name, t, _ in cases if name.startswith("DuckDB"))
        for name, t, summary in cases:
            valid = summary.ordered and summary.records == records and summary.checksum == expected.checksum
            report.add(name, round(t, 3), round(nbytes / t / 1e6, 1), round(t / base, 2), "yes" if valid else "NO")
        report.note(
            f"{nbytes / 1e6:.0f} MB, {records} records of 100 bytes; generation took {t_gen:.2f} s "
            f"({n_in} data partitions -> {n_out} sort partitions)"
        )
        report.note("target: seekstack within 1.5x of the single DuckDB ORDER BY time on one machine")
        report.emit()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _duckdb_sort(files: list[str], workdir: str, threads: int):
    import duckdb

    from seekstack.dataframe.execution.duck import sql_list
    from seekstack.dataframe.sort.validate import validate_partitions

    out = os.path.join(workdir, "duckdb-sorted.parquet")
    con = duckdb.connect(config={"threads": threads})
    con.execute("SET enable_progress_bar = false")
    t = _timed(
        lambda: con.execute(
            f"COPY (SELECT key, record FROM read_parquet({sql_list(files)}) ORDER BY key) TO '{out}' "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
    )
    con.close()
    return t, validate_partitions([[out]])


def _polars_sort(files: list[str], workdir: str):
    import polars as pl

    from seekstack.dataframe.sort.validate import validate_partitions

    out = os.path.join(workdir, "polars-sorted.parquet")
    t = _timed(lambda: pl.scan_parquet(files).select("key", "record").sort("key").sink_parquet(out))
    return t, validate_partitions([[out]])


if __name__ == "__main__":
    raise SystemExit(main())
