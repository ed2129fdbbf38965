"""An fsspec filesystem for `3fs://` URLs, so pandas, pyarrow, polars and duckdb read and write cluster files.

Importing this module registers the class for the protocols `3fs` and `hf3fs`. `hf3fs://` exists because an RFC 3986
URL scheme must start with a letter: pandas' URL check rejects `3fs://` and would treat it as a local path, so give
pandas `hf3fs://` URLs (or an open file). `3fs://a/b` and `3fs:///a/b` both name the cluster path `/a/b`.

Which cluster: storage options `data=` (the `--data DIR` of `seekstack fs up`), or `mgmtd=` + `token=`, or an
existing `client=` (any object with the `seekstack.fs` client API, e.g. `LocalDirClient`); default
`$SEEKSTACK_FS_DATA`. `local=DIR` serves a plain local directory through the same API (`LocalDirClient`).

>>> # import seekstack.fs.fsspec_fs, pyarrow.parquet as pq, duckdb
>>> # fs = fsspec.filesystem("3fs", data="/tmp/3fs")
>>> # pq.write_table(table, "/t.parquet", filesystem=fs)
>>> # duckdb.register_filesystem(fs); duckdb.sql("select * from '3fs:///t.parquet'")
>>> # pandas.read_csv("hf3fs:///x.csv", storage_options={"data": "/tmp/3fs"})
"""

from __future__ import annotations

import datetime
import stat as _stat
import sys
import threading

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

PROTOCOLS = ("3fs", "hf3fs")


def _kind(mode: int) -> str:
    if _stat.S_ISDIR(mode):
        return "directory"
    if _stat.S_ISREG(mode):
        return "file"
    return "other"


class SeekstackFileSystem(AbstractFileSystem):
    """fsspec view of a `seekstack.fs` cluster (see the module docstring for how it finds the cluster)."""

    protocol = PROTOCOLS
    root_marker = "/"

    def __init__(
        self,
        client=None,
        data: str | None = None,
        mgmtd: str | None = None,
        token: str | None = None,
        local: str | None = None,
        **kw,
    ):
        super().__init__(**kw)
        if client is None and local is not None:
            from seekstack.fs.usrbio.localdir import LocalDirClient

            client = LocalDirClient(local)
            self._owns_client = True
        elif client is None:
            from seekstack.fs.client import connect

            client = connect(data, mgmtd=mgmtd, token=token)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        for proto in PROTOCOLS:
            if path.startswith(proto + "://"):
                path = path[len(proto) + 3 :]
                break
        path = "/" + path.lstrip("/")
        return path.rstrip("/") or "/"

    @staticmethod
    def _get_kwargs_from_urls(path):
        return {}

    def unstrip_protocol(self, name: str) -> str:
        return "3fs://" + name

    # -------------------------------------------------------------- metadata
    def _info_from(self, path: str, st, link: bool = False) -> dict:
        return {
            "name": path,
            "size": st.st_size,
            "type": _kind(st.st_mode),
            "mode": st.st_mode,
            "ino": st.st_ino,
            "mtime": st.st_mtime,
            "created": st.st_ctime,
            "islink": link,
        }

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        lst = self.client.lstat(path)
        link = _stat.S_ISLNK(lst.st_mode)
        st = self.client.stat(path) if link else lst
        return self._info_from(path, st, link)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        st = self.client.stat(path)
        if not _stat.S_ISDIR(st.st_mode):
            out = [self._info_from(path, st)]
        else:
            base = "" if path == "/" else path
            out = []
            for e in self.client.scandir(path):
                p = f"{base}/{e['name']}"
                try:
                    out.append(self.info(p))
                except FileNotFoundError:
                    continue  # removed meanwhile, or a dangling symlink
        return out if detail else [o["name"] for o in out]

    def created(self, path):
        return datetime.datetime.fromtimestamp(self.info(path)["created"], tz=datetime.timezone.utc)

    def modified(self, path):
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)

    # -------------------------------------------------------------- namespace changes
    def mkdir(self, path, create_parents=True, **kwargs):
        self.client.mkdir(self._strip_protocol(path), parents=create_parents)

    def makedirs(self, path, exist_ok=False):
        self.client.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def rmdir(self, path):
        self.client.rmdir(self._strip_protocol(path))

    def _rm(self, path):
        path = self._strip_protocol(path)
        if _stat.S_ISDIR(self.client.lstat(path).st_mode):
            self.client.rmdir(path)
        else:
            self.client.unlink(path)

    def rm_file(self, path):
        self._rm(path)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        """A rename on the cluster (atomic, no data copied)."""
        if isinstance(path1, str) and isinstance(path2, str):
            self.client.rename(self._strip_protocol(path1), self._strip_protocol(path2))
        else:
            super().mv(path1, path2, recursive=recursive, maxdepth=maxdepth, **kwargs)

    def cp_file(self, path1, path2, **kwargs):
        src, dst = self._strip_protocol(path1), self._strip_protocol(path2)
        if self.isdir(src):
            self.makedirs(dst, exist_ok=True)
            return
        with self.client.open(src, "rb") as fi, self.client.open(dst, "wb") as fo:
            off, step = 0, 8 << 20
            while chunk := fi.pread(step, off):
                fo.pwrite(chunk, off)
                off += len(chunk)

    def touch(self, path, truncate=True, **kwargs):
        path = self._strip_protocol(path)
        if truncate or not self.exists(path):
            self.client.open(path, "wb").close()
        else:
            import time

            now = time.time()
            self.client.utime(path, (now, now))

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        with self.client.open(path, "rb") as f:
            size = f.size
            start = 0 if start is None else (start + size if start < 0 else start)
            end = size if end is None else (end + size if end < 0 else min(end, size))
            return f.pread(max(0, end - start), start) if end > start else b""

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if not autocommit:
            raise ValueError("autocommit: transactions are not supported; writes go straight to the cluster")
        return SeekstackFile(self, self._strip_protocol(path), mode, block_size, cache_options=cache_options)

    def close(self):
        if self._owns_client:
            self.client.close()


_OPEN_RAW: set = set()


class SeekstackFile(AbstractBufferedFile):
    """A buffered file: reads go through fsspec's read-ahead cache to positioned cluster reads, writes are
    flushed in `block_size` pieces with positioned writes."""

    DEFAULT_BLOCK_SIZE = 4 << 20

    def __init__(self, fs, path, mode="rb", block_size=None, cache_options=None, **kwargs):
        if mode not in ("rb", "wb", "ab", "xb"):
            raise ValueError(f"mode: expected rb, wb, ab or xb, got {mode!r}")
        self.raw = fs.client.open(path, mode)
        _OPEN_RAW.add(self.raw)  # see __del__
        self._base = self.raw.size if mode == "ab" else 0
        size = self.raw.size if mode == "rb" else None
        super().__init__(fs, path, mode, block_size or "default", cache_options=cache_options, size=size, **kwargs)

    def _fetch_range(self, start, end):
        return self.raw.pread(end - start, start)

    def _initiate_upload(self):
        pass

    def _upload_chunk(self, final=False):
        data = self.buffer.getbuffer()
        if len(data):
            self.raw.pwrite(data, self._base + self.offset)
        del data  # release the BytesIO export before fsspec replaces the buffer
        return True

    def close(self):
        if self.closed:
            return
        try:
            super().close()
        finally:
            try:
                self.raw.close()
            finally:
                _OPEN_RAW.discard(self.raw)

    def _close_quietly(self):
        try:
            self.close()
        except (OSError, ValueError):
            pass  # the cluster or the client is gone; nothing left to settle

    def __del__(self):
        # Libraries (pyarrow, pandas, DuckDB's fsspec bridge) leave files to the garbage collector, which may run on
        # any thread, including the client's event-loop thread, where close()'s blocking calls would wait on
        # themselves: there the close runs on its own thread (the client file stays referenced from _OPEN_RAW until
        # then, so the collector never finalizes it). Elsewhere, and at interpreter shutdown, when no thread can be
        # started (Thread.start() would wait forever), it closes in place.
        if getattr(self, "closed", True):
            return
        client_thread = getattr(getattr(self.raw, "_client", None), "_thread", None)
        if threading.current_thread() is client_thread and not sys.is_finalizing():
            threading.Thread(target=self._close_quietly, name="seekstack-fsspec-close", daemon=True).start()
        else:
            self._close_quietly()


def register() -> None:
    """Register `SeekstackFileSystem` with fsspec for `3fs://` and `hf3fs://` (done on import)."""
    for proto in PROTOCOLS:
        fsspec.register_implementation(proto, SeekstackFileSystem, clobber=True)


register()

__all__ = ["SeekstackFileSystem", "SeekstackFile", "register"]
