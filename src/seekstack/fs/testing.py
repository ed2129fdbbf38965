"""A local cluster for tests, demos and benchmarks that checks, when it stops, that no service process is left.

>>> import tempfile
>>> with local_cluster(tempfile.mkdtemp() + "/c", storage_nodes=1, replicas=1) as cluster:
...     with cluster.connect() as fs:
...         fs.write_bytes("/hello", b"hi")
...         fs.read_bytes("/hello")
2
b'hi'
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from seekstack.fs.cluster import Cluster


def processes_mentioning(marker: str) -> list[str]:
    """PIDs whose command line contains `marker` (e.g. a cluster's data directory)."""
    out = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                out.append(p.name)
        except OSError:
            pass
    return out


@contextlib.contextmanager
def local_cluster(path, **options):
    """Start a `Cluster` under `path` on 127.0.0.1; on exit stop it and raise if any of its processes survived."""
    cluster = Cluster(path, **options)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        left = processes_mentioning(str(cluster.dir))
        if left:
            raise RuntimeError(f"cluster processes left running: {left}")
