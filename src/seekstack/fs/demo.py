"""Demo stage: start a local cluster, store the previous stage's files (or a synthetic data set) on it, read them
back through another client with checksums, survive a kill -9 of a storage process, and shut down."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path


def _inputs(workdir: Path) -> list[Path]:
    upstream = workdir.parent / "dataframe"
    files = sorted(p for p in upstream.rglob("*") if p.is_file()) if upstream.exists() else []
    if files:
        return files[:64]
    synth = workdir / "synthetic"
    synth.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(4):
        p = synth / f"part-{i}.bin"
        p.write_bytes(os.urandom(3 << 20))
        out.append(p)
    return out


def run_demo(workdir: Path) -> dict[str, str]:
    from seekstack.fs.cluster import Cluster

    workdir = Path(workdir)
    data_dir = workdir / "cluster"
    shutil.rmtree(data_dir, ignore_errors=True)
    files = _inputs(workdir)
    t0 = time.perf_counter()
    with Cluster(data_dir, storage_nodes=3, replicas=3, targets_per_node=2, chunk_size=1 << 20, lease=1.0) as c:
        up = time.perf_counter() - t0
        digests = {}
        total = 0
        with c.connect() as fs:
            fs.mkdir("/demo", exist_ok=True)
            t1 = time.perf_counter()
            for p in files:
                data = p.read_bytes()
                fs.write_bytes(f"/demo/{p.name}", data)
                digests[p.name] = hashlib.sha256(data).hexdigest()
                total += len(data)
            wt = time.perf_counter() - t1
        with c.connect() as other:
            t1 = time.perf_counter()
            ok = all(hashlib.sha256(other.read_bytes(f"/demo/{n}")).hexdigest() == d for n, d in digests.items())
            rt = time.perf_counter() - t1
            c.kill("storage2", signal.SIGKILL)
            ok_degraded = all(
                hashlib.sha256(other.read_bytes(f"/demo/{n}")).hexdigest() == d for n, d in digests.items()
            )
            c.spawn("storage2")
            t1 = time.perf_counter()
            c.wait_serving(60)
            resync = time.perf_counter() - t1
    mib = total / 2**20
    return {
        "cluster": f"mgmtd + meta + 3 storage processes, 3 replicas, up in {up:.1f} s",
        "stored": f"{len(files)} files, {mib:.1f} MiB (write {mib / wt:.0f} MiB/s, read {mib / rt:.0f} MiB/s)",
        "checksums": "all match" if ok else "MISMATCH",
        "kill -9 storage2": f"reads {'still correct' if ok_degraded else 'WRONG'}; resynced and serving in "
        f"{resync:.1f} s",
    }
