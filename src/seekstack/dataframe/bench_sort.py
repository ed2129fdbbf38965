"""`seekstack bench sort [--size 256MB] [--executors N] [--repeat 3] [--ray] [--data-root 3fs:///sort]`: GraySort
on the dataframe layer (with 1 and with N executors) next to one DuckDB ``ORDER BY`` and Polars' sort of the same
generated data, every run validated (order, count, checksum).

``--data-root 3fs://...`` keeps the input, the intermediate files and our output on a seekstack.fs cluster (the one
of ``--fs-data DIR`` or ``$SEEKSTACK_FS_DATA``; with neither, a local 3-node cluster is started for the run); the
baselines then read the same input from the cluster and write their output to the local scratch directory.

Every figure is relative to the single-process DuckDB sort measured in the same run (target: within 1.5x); the cases
run in interleaved rounds and the table shows medians, as other processes share the cores.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
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


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of this process and of `pids` (worker processes), from /proc."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _timed_cpu(fn, pids: list[int]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (this process + `pids`) of `fn()`: the CPU figure is what the cores spent, which
    other processes on shared cores disturb much less than the wall time."""
    c0, t0 = _cpu_seconds(pids), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu_seconds(pids) - c0


def main(argv: list[str] | None = None) -> int:
    import seekstack.dataframe as sp
    from seekstack.bench import Report
    from seekstack.dataframe.sort.pipeline import generate_input, validate_partitions

    p = argparse.ArgumentParser(prog="seekstack bench sort", description=__doc__)
    p.add_argument("--size", default="256MB", help="data size (records of 100 bytes), e.g. 256MB, 1GB")
    p.add_argument("--executors", type=int, default=os.cpu_count() or 1, help="process-pool workers (also run: 1)")
    p.add_argument("--partitions", type=int, default=0, help="sort partitions (power of two; 0: auto)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; every case runs once per round, medians shown")
    p.add_argument("--ray", action="store_true", help="also run on a local Ray (127.0.0.1)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--data-root", default=None, help="session data root, local or 3fs://... (default: under workdir)")
    p.add_argument("--fs-data", default=None, help="data dir of the seekstack.fs cluster for 3fs:// (fs up --data)")
    args = p.parse_args(argv)
    if args.executors < 1 or args.repeat < 1:
        raise ValueError("--executors and --repeat must be >= 1")
    size = parse_size(args.size)
    records = max(1, size // RECORD_BYTES)
    nbytes = records * RECORD_BYTES
    n_out = args.partitions or auto_partitions(nbytes, args.executors)
    n_in = args.executors  # one shuffle task per executor: each reads its input once and writes all its buckets
    workdir = args.workdir or tempfile.mkdtemp(prefix="seekstack-sort-")
    root = args.data_root or os.path.join(workdir, "root")
    cluster, storage = _storage(root, args.fs_data, workdir)
    threads = os.cpu_count() or 1
    columns = ["case", "seconds (median)", "MB/s", "x DuckDB time", "CPU s", "x DuckDB CPU", "valid"]
    report = Report("sort", columns)
    report.params.update(
        size=nbytes,
        records=records,
        executors=args.executors,
        sort_partitions=n_out,
        data_partitions=n_in,
        threads=threads,
        repeat=args.repeat,
        data_root=root,
    )
    sessions = []
    try:
        with sp.init(
            data_root=root, num_executors=args.executors, job_id="gen-" + uuid.uuid4().hex[:6], storage_options=storage
        ) as s:
            sessions.append(("generate", s))
            data = generate_input(s, records, n_in, n_out)
            t_gen = _timed(data.compute)
            gen_files = [f for part in data._partitions() for f in part]
        expected = validate_partitions([[f] for f in gen_files])

        # One session (and warm worker pool) per configuration, reused by every round.
        for ex in sorted({1, args.executors}):
            name = f"seekstack.dataframe ({ex} executor{'s' if ex > 1 else ''})"
            sessions.append((name, _session(sp, root, ex, storage_options=storage)))
        if args.ray:
            from seekstack.dataframe.execution.ray_executor import start_ray

            start_ray("local", args.executors)  # started outside the timing: Ray init is a one-off ~6 s
            rs = _session(sp, root, args.executors, ray_address="local", storage_options=storage)
            sessions.append((f"seekstack.dataframe on Ray ({args.executors} CPUs)", rs))
        cases = {name: (lambda s=session: _ours(s, gen_files, n_in, n_out)) for name, session in sessions[1:]}
        cases["DuckDB ORDER BY (1 process)"] = lambda: _duckdb_sort(gen_files, workdir, threads)
        cases["Polars sort (1 process)"] = lambda: _polars_sort(gen_files, workdir)
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpus: dict[str, list[float]] = {name: [] for name in cases}
        valid = dict.fromkeys(cases, True)
        for _ in range(args.repeat):  # rounds interleave the cases, so load from other processes hits all alike
            for name, run in cases.items():
                t, cpu, summary = run()
                times[name].append(t)
                if cpu is not None:
                    cpus[name].append(cpu)
                ok = summary.ordered and summary.records == records and summary.checksum == expected.checksum
                valid[name] = valid[name] and ok
        base = statistics.median(times["DuckDB ORDER BY (1 process)"])
        base_cpu = statistics.median(cpus["DuckDB ORDER BY (1 process)"])
        for name in cases:
            t = statistics.median(times[name])
            cpu = statistics.median(cpus[name]) if cpus[name] else None
            ok = "yes" if valid[name] else "NO"
            cpu_cols = (round(cpu, 2), round(cpu / base_cpu, 2)) if cpu is not None else ("-", "-")
            report.add(name, round(t, 3), round(nbytes / t / 1e6, 1), round(t / base, 2), *cpu_cols, ok)
        report.params["seconds"] = {name: [round(t, 3) for t in ts] for name, ts in times.items()}
        report.params["cpu_seconds"] = {name: [round(c, 3) for c in cs] for name, cs in cpus.items()}
        report.note(
            f"{nbytes / 1e6:.0f} MB, {records} records of 100 bytes; generation took {t_gen:.2f} s (not counted); "
            f"{n_in} data partitions -> {n_out} sort partitions; medians of {args.repeat} interleaved rounds"
        )
        report.note("target: seekstack within 1.5x of the single DuckDB ORDER BY time on one machine")
        report.note("CPU s: user+system seconds of the driver and its pool workers (Ray workers not counted)")
        report.emit()
    finally:
        from seekstack.dataframe import io

        for _, session in sessions:
            session.shutdown()
            if args.workdir is None and not io.is_local(root):
                io.remove_tree(session.job_dir)  # a local root goes with the scratch directory
        if args.ray:
            import ray

            ray.shutdown()
        if cluster is not None:
            cluster.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def auto_partitions(nbytes: int, executors: int) -> int:
    """Sort partitions: a power of two, at least two per executor (so the sort step balances), about 32 MB each."""
    want = max(2 * executors, -(-nbytes // (32 << 20)))
    return 1 << max(1, (want - 1).bit_length())


def _storage(root: str, fs_data: str | None, workdir: str):
    """(a cluster we started or None, storage options) for `root`: a 3fs:// root needs a seekstack.fs cluster."""
    from seekstack.dataframe import io

    if io.protocol_of(root) not in io.FS_PROTOCOLS:
        return None, None
    fs_data = fs_data or os.environ.get("SEEKSTACK_FS_DATA")
    cluster = None
    if not fs_data:
        from seekstack.fs.cluster import Cluster

        cluster = Cluster(os.path.join(workdir, "3fs"), storage_nodes=3, replicas=1).start()
        fs_data = str(cluster.dir)
    return cluster, {"3fs": {"data": os.path.abspath(fs_data)}}


def _session(sp, root: str, executors: int, ray_address: str | None = None, storage_options=None):
    session = sp.init(
        data_root=root,
        num_executors=executors,
        ray_address=ray_address,
        job_id=uuid.uuid4().hex[:8],
        storage_options=storage_options,
    )
    # Start the workers (and their imports) outside the timing, as a long-running service would have them.
    session.from_items(list(range(4 * executors))).repartition(2 * executors, by_rows=True).count()
    return session


def _ours(session, files: list[str], n_in: int, n_out: int):
    from seekstack.dataframe import io
    from seekstack.dataframe.sort.pipeline import sort_records, validate_partitions

    io.remove_tree(session.tasks_dir)  # every round starts from an empty job: no checkpoint is reused
    io.makedirs(session.tasks_dir)
    sorted_df = sort_records(session.read_parquet(files).repartition(n_in), n_out)
    pids = getattr(session._get_executor(), "worker_pids", list)()  # Ray workers are not counted
    t, cpu = _timed_cpu(sorted_df.compute, pids)
    return t, (cpu if pids else None), validate_partitions(sorted_df._partitions())


def _duckdb_sort(files: list[str], workdir: str, threads: int):

    from seekstack.dataframe.execution import duck
    from seekstack.dataframe.execution.duck import sql_list
    from seekstack.dataframe.sort.validate import validate_partitions

    out = os.path.join(workdir, "duckdb-sorted.parquet")
    con = duck.connect(threads, None, files)  # reads a 3fs:// input through the same fsspec bridge as our tasks
    t, cpu = _timed_cpu(
        lambda: con.execute(
            f"COPY (SELECT key, record FROM read_parquet({sql_list(files)}) ORDER BY key) TO '{out}' "
            "(FORMAT parquet, COMPRESSION zstd)"
        ),
        [],
    )
    duck.close(con)
    return t, cpu, validate_partitions([[out]])


def _polars_sort(files: list[str], workdir: str):
    import polars as pl

    from seekstack.dataframe import io
    from seekstack.dataframe.sort.validate import validate_partitions

    out = os.path.join(workdir, "polars-sorted.parquet")
    if all(io.is_local(f) for f in files):
        t, cpu = _timed_cpu(lambda: pl.scan_parquet(files).select("key", "record").sort("key").sink_parquet(out), [])
    else:  # Polars cannot read fsspec URLs lazily: read each file through its file object, then sort in memory

        def run():
            frames = []
            for f in files:
                with io.open_input(f) as src:
                    frames.append(pl.read_parquet(src, columns=["key", "record"]))
            pl.concat(frames).sort("key").write_parquet(out)

        t, cpu = _timed_cpu(run, [])
    return t, cpu, validate_partitions([[out]])


if __name__ == "__main__":
    raise SystemExit(main())
