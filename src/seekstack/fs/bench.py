"""`seekstack bench fs`: sequential write/read throughput through the client (3 replicas on loopback) next to
raw local-disk write/read of the same bytes, and small-file create/stat rates next to the local file system —
all measured in the same run.

Targets from the issue: read >= 50 % of the local-disk read rate; write >= 25 % of the local-disk write rate
(three replicas write three times the bytes).
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import tempfile
import time

from seekstack.bench import Report, measure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack bench fs")
    p.add_argument("--size-mb", type=int, default=64, help="bytes per sequential pass")
    p.add_argument("--block-mb", type=int, default=8, help="bytes per write()/read() call")
    p.add_argument("--chunk-kb", type=int, default=1024, help="file chunk size")
    p.add_argument("--files", type=int, default=200, help="small files for the create/stat rates")
    p.add_argument("--storage-nodes", type=int, default=3)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the cluster and the local files live (default: a temp dir)")
    a = p.parse_args(argv)

    from seekstack.fs.cluster import Cluster

    root = tempfile.mkdtemp(prefix="seekstack-bench-fs-", dir=a.workdir)
    size, block = a.size_mb << 20, a.block_mb << 20
    data = os.urandom(size)
    report = Report("fs", columns=["case", "seekstack.fs", "local disk", "ratio", "target"])
    report.params = vars(a) | {"replicas": a.replicas}
    try:
        cluster = Cluster(
            os.path.join(root, "cluster"),
            storage_nodes=a.storage_nodes,
            replicas=a.replicas,
            targets_per_node=2,
            chunk_size=a.chunk_kb << 10,
        )
        cluster.start()
        try:
            fs = cluster.connect()
            local_dir = os.path.join(root, "local")
            os.makedirs(local_dir)
            rates = _throughput(fs, local_dir, data, block, a.repeats)
            small = _small_files(fs, local_dir, a.files)
            fs.close()
        finally:
            cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    mb = size / 2**20
    w_fs, w_local = mb / rates["fs_write"], mb / rates["local_write"]
    r_fs, r_local = mb / rates["fs_read"], mb / rates["local_read"]
    report.add("seq write MiB/s", round(w_fs, 1), round(w_local, 1), round(w_fs / w_local, 3), ">= 0.25")
    report.add("seq read MiB/s", round(r_fs, 1), round(r_local, 1), round(r_fs / r_local, 3), ">= 0.5")
    dw = dr = 0.0
    if "direct_write" in rates:
        dw, dr = mb / rates["direct_write"], mb / rates["direct_read"]
        report.add("seq write vs O_DIRECT+fsync", round(w_fs, 1), round(dw, 1), round(w_fs / dw, 3), ">= 0.25")
        report.add("seq read vs O_DIRECT", round(r_fs, 1), round(dr, 1), round(r_fs / dr, 3), ">= 0.5")
    for k in ("create", "stat"):
        report.add(
            f"small-file {k}/s",
            round(small[f"fs_{k}"]),
            round(small[f"local_{k}"]),
            round(small[f"fs_{k}"] / small[f"local_{k}"], 4),
            "-",
        )
    report.note(
        f"{mb:.0f} MiB per pass in {block >> 20} MiB calls, {a.replicas} replicas on {a.storage_nodes} storage "
        f"processes, {a.chunk_kb} KiB chunks. Local disk = the same bytes to a file in the same directory tree "
        "through the page cache (no fsync, like the cluster's storage), and with O_DIRECT (the disk itself)."
    )
    verdict = {True: "met", False: "MISSED"}
    report.note(
        f"targets vs page cache: write {verdict[w_fs / w_local >= 0.25]}, read {verdict[r_fs / r_local >= 0.5]}"
    )
    if "direct_write" in rates:
        report.note(f"targets vs O_DIRECT: write {verdict[w_fs / dw >= 0.25]}, read {verdict[r_fs / dr >= 0.5]}")
    report.emit()
    return 0


def _throughput(fs, local_dir: str, data: bytes, block: int, repeats: int) -> dict[str, float]:
    mv = memoryview(data)
    local_path = os.path.join(local_dir, "seq.bin")

    # Every write pass goes to a new file on both sides, so no pass pays for truncating the previous one.
    passes = {"fs": 0, "local": 0}

    def fs_write():
        passes["fs"] += 1
        with fs.open(f"/seq{passes['fs']}.bin", "wb") as f:
            for off in range(0, len(data), block):
                f.write(mv[off : off + block])

    def fs_read():
        with fs.open(f"/seq{passes['fs']}.bin", "rb") as f:
            while f.read(block):
                pass

    def local_write():
        passes["local"] += 1
        with open(f"{local_path}.{passes['local']}", "wb", buffering=0) as f:
            for off in range(0, len(data), block):
                f.write(mv[off : off + block])

    def local_read():
        with open(f"{local_path}.{passes['local']}", "rb", buffering=0) as f:
            while f.read(block):
                pass

    direct_path = os.path.join(local_dir, "direct.bin")
    aligned = mmap.mmap(-1, block)  # O_DIRECT needs page-aligned buffers

    def direct_write():
        fd = os.open(direct_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        try:
            for off in range(0, len(data) - block + 1, block):
                aligned[:] = mv[off : off + block]
                os.write(fd, aligned)
            os.fsync(fd)
        finally:
            os.close(fd)

    def direct_read():
        fd = os.open(direct_path, os.O_RDONLY | os.O_DIRECT)
        try:
            while os.readv(fd, [aligned]) == block:
                pass
        finally:
            os.close(fd)

    cases = [("fs_write", fs_write), ("fs_read", fs_read), ("local_write", local_write), ("local_read", local_read)]
    if hasattr(os, "O_DIRECT") and len(data) % block == 0:
        try:
            direct_write()
            cases += [("direct_write", direct_write), ("direct_read", direct_read)]
        except OSError:  # the file system does not support O_DIRECT (tmpfs, some overlays)
            pass
    out = {}
    for name, fn in cases:
        out[name] = measure(fn, warmup=1, repeats=repeats)
    with fs.open(f"/seq{passes['fs']}.bin", "rb") as f:  # the bytes survived the round trip
        assert f.read() == data, "read-back mismatch"
    return out


def _small_files(fs, local_dir: str, n: int) -> dict[str, float]:
    fs.mkdir("/small", exist_ok=True)
    sd = os.path.join(local_dir, "small")
    os.makedirs(sd, exist_ok=True)
    out = {}
    t = time.perf_counter()
    for i in range(n):
        fs.open(f"/small/f{i}", "wb").close()
    out["fs_create"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
        fs.stat(f"/small/f{i}")
    out["fs_stat"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
        open(os.path.join(sd, f"f{i}"), "wb").close()
    out["local_create"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(n):
        os.stat(os.path.join(sd, f"f{i}"))
    out["local_stat"] = n / (time.perf_counter() - t)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
