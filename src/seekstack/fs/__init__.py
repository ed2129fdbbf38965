"""seekstack.fs — a 3FS-style distributed file system: mgmtd, stateless meta over a transactional KV store, CRAQ
storage chains, and a client that reads and writes storage directly.

>>> # from seekstack.fs import Cluster, connect
>>> # with Cluster("/tmp/fs") as cluster:
>>> #     fs = connect("/tmp/fs"); fs.write_bytes("/a", b"x"); fs.read_bytes("/a")
"""

from __future__ import annotations


def connect(*args, **kwargs):
    """See `seekstack.fs.client.connect`."""
    from seekstack.fs.client import connect as _connect

    return _connect(*args, **kwargs)


def __getattr__(name):
    if name == "Cluster":
        from seekstack.fs.cluster import Cluster

        return Cluster
    if name in ("FsClient", "StatResult"):
        from seekstack.fs import client

        return getattr(client, name)
    if name == "File":
        from seekstack.fs.file import File

        return File
    raise AttributeError(name)


__all__ = ["Cluster", "File", "FsClient", "StatResult", "connect"]
