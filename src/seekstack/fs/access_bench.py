"""Benchmark rows for the access layers, each a ratio to the plain client measured in the same run:

- batched I/O (USRBIO-style ring, many reads in flight) vs one `pread` at a time: IOPS at 4 KiB, GB/s at 1 MiB;
- the FUSE mount vs the client: sequential read and write throughput;
- KVCache `get_many` (one batch through the ring) vs `get` one block at a time.

`run(report, client, mountpoint)` adds the rows to an existing report (e.g. `seekstack bench fs`), matching its
column names; `main(argv)` starts a local cluster, mounts it when FUSE is available, and emits its own table.

>>> # from seekstack.bench import Report
>>> # report = Report("fs", columns=["case", "value", "unit", "baseline", "ratio"]); run(report, client, "/mnt/3fs")
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from seekstack.fs.kvcache import KVCacheStore, prefix_key
from seekstack.fs.usrbio import Ior, Iov, dereg_fd, prep_io, reg_fd, submit_ios, wait_for_ios

COLUMNS = ["case", "value", "unit", "baseline", "ratio"]


def _best(fn, repeats: int) -> float:
    """Best-of-`repeats` wall time (seconds) after one warm-up call: the least noisy figure on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _batched_reads(f, offsets, size: int, depth: int):
    fd = reg_fd(f)
    iov, ior = Iov(depth * size), Ior(depth, io_depth=0)

    def go():
        for start in range(0, len(offsets), depth):
            part = offsets[start : start + depth]
            for i, off in enumerate(part):
                prep_io(ior, iov, True, i * size, fd, int(off), size)
            submit_ios(ior)
            got = wait_for_ios(ior, len(part), min_results=len(part))
            assert all(c.result == size for c in got)

    def close():
        ior.destroy()
        iov.close()
        dereg_fd(fd)

    return go, close


def bench_rows(client, mountpoint: str | None = None, *, file_mib: int = 32, repeats: int = 3, seed: int = 0):
    """Measure and return the rows as dicts with keys `COLUMNS`."""
    rng = np.random.default_rng(seed)
    rows = []
    path = "/access_bench.bin"
    data = rng.integers(0, 256, file_mib << 20, dtype=np.uint8).tobytes()
    client.write_bytes(path, data)
    f = client.open(path)
    try:
        # 4 KiB random reads
        offs = rng.integers(0, len(data) - 4096, 1024) // 4096 * 4096
        plain = _best(lambda: [f.pread(4096, int(o)) for o in offs], repeats)
        go, close = _batched_reads(f, offs, 4096, 256)
        batched = _best(go, repeats)
        close()
        rows.append(
            dict(
                case="batched I/O 4 KiB random read",
                value=len(offs) / batched,
                unit="IOPS",
                baseline=len(offs) / plain,
                ratio=plain / batched,
            )
        )
        # 1 MiB reads
        mib = 1 << 20
        offs = rng.integers(0, len(data) - mib, 48)
        plain = _best(lambda: [f.pread(mib, int(o)) for o in offs], repeats)
        go, close = _batched_reads(f, offs, mib, 16)
        batched = _best(go, repeats)
        close()
        rows.append(
            dict(
                case="batched I/O 1 MiB read",
                value=len(offs) * mib / batched / 1e9,
                unit="GB/s",
                baseline=len(offs) * mib / plain / 1e9,
                ratio=plain / batched,
            )
        )
    finally:
        f.close()
    # FUSE mount vs client, sequential
    if mountpoint:
        nbytes = len(data)
        t_client = _best(lambda: client.read_bytes(path), repeats)

        def mount_read():
            with open(os.path.join(mountpoint, path.lstrip("/")), "rb", buffering=0) as g:
                while g.read(1 << 20):
                    pass

        t_mount = _best(mount_read, repeats)
        rows.append(
            dict(
                case="FUSE mount sequential read",
                value=nbytes / t_mount / 1e9,
                unit="GB/s",
                baseline=nbytes / t_client / 1e9,
                ratio=t_client / t_mount,
            )
        )
        t_client = _best(lambda: client.write_bytes("/access_bench_w.bin", data), 1)

        def mount_write():
            with open(os.path.join(mountpoint, "access_bench_w.bin"), "wb", buffering=0) as g:
                mv = memoryview(data)
                for off in range(0, nbytes, 1 << 20):
                    g.write(mv[off : off + (1 << 20)])

        t_mount = _best(mount_write, 1)
        rows.append(
            dict(
                case="FUSE mount sequential write",
                value=nbytes / t_mount / 1e9,
                unit="GB/s",
                baseline=nbytes / t_client / 1e9,
                ratio=t_client / t_mount,
            )
        )
        client.unlink("/access_bench_w.bin")
    client.unlink(path)
    # KVCache
    store = KVCacheStore(client, "/access_bench_kv", capacity_bytes=1 << 30)
    block = 256 << 10
    keys = [prefix_key([i, seed]) for i in range(64)]
    for k in keys:
        store.put(k, rng.bytes(block))
    one_by_one = _best(lambda: [store.get(k) for k in keys], repeats)
    batched = _best(lambda: store.get_many(keys), repeats)
    rows.append(
        dict(
            case="KVCache get_many (64 x 256 KiB)",
            value=len(keys) * block / batched / 1e9,
            unit="GB/s",
            baseline=len(keys) * block / one_by_one / 1e9,
            ratio=one_by_one / batched,
        )
    )
    store.close()
    client.remove("/access_bench_kv", recursive=True)
    return rows


_ALIASES = {
    "case": ("case", "name", "what"),
    "value": ("value", "seekstack.fs", "measured"),
    "baseline": ("baseline", "local disk", "reference"),
    "ratio": ("ratio", "speedup", "vs baseline", "x"),
    "target": ("target", "note", "notes"),
}


def run(report, client=None, mountpoint: str | None = None, **kw) -> None:
    """Add the access-layer rows to `report` (a `seekstack.bench.Report`), filling the columns it has by name
    (`case`, a value column, a baseline column, `ratio`, `target`; the unit joins the case without a `unit` column).
    """
    if client is None:
        raise ValueError("client: pass a connected seekstack.fs client")
    cols = [c.lower() for c in report.columns]
    for r in bench_rows(client, mountpoint, **kw):
        r = dict(r, target=f"baseline: {'plain client' if 'FUSE' not in r['case'] else 'client, no mount'}")
        if "unit" not in cols:
            r["case"] = f"{r['case']} {r['unit']}"
        values = []
        for col in cols:
            key = next((k for k, names in _ALIASES.items() if col in names), col)
            v = r.get(key, "")
            values.append(round(v, 3) if isinstance(v, float) else v)
        report.add(*values)
    report.note("batched I/O and KVCache rows: ratio = plain client time / batched time (higher is better)")
    report.note("FUSE rows: ratio = client time / mount time (the mount's overhead; < 1 means slower)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack bench fs_access", description=__doc__.split("\n\n")[0])
    p.add_argument("--file-mib", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-mount", action="store_true", help="skip the FUSE rows")
    args = p.parse_args(argv)
    from seekstack.bench import Report
    from seekstack.fs.cluster import Cluster

    report = Report("fs_access", columns=COLUMNS, params=vars(args))
    with tempfile.TemporaryDirectory(prefix="seekstack-bench-") as tmp:
        with Cluster(os.path.join(tmp, "cluster"), storage_nodes=3, replicas=2) as cluster:
            client = cluster.connect()
            mp = None
            if not args.no_mount and os.access("/dev/fuse", os.R_OK | os.W_OK):
                from seekstack.fs.fuse import mount_main

                mp = os.path.join(tmp, "mnt")
                os.mkdir(mp)
                if mount_main([mp, "--data", str(cluster.dir)]) != 0:
                    mp = None
            try:
                run(report, client, mp, file_mib=args.file_mib, repeats=args.repeats)
            finally:
                if mp:
                    from seekstack.fs.fuse import umount_main

                    umount_main([mp])
                client.close()
    report.emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
