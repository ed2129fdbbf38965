"""`seekstack.fs.connect(...)`: the client. Metadata calls go to a meta service, data straight to storage.

The client owns a private asyncio loop on a daemon thread, so the API is plain blocking calls (safe to use from
several threads) while chunk reads and writes of one call run concurrently.

>>> # fs = connect("/tmp/cluster")            # the --data DIR of `seekstack fs up`
>>> # with fs.open("/hello.txt", "wb") as f: f.write(b"hi")
>>> # fs.open("/hello.txt").read()           # b'hi'
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import stat as _stat
import threading
import time
import uuid
from dataclasses import dataclass

from seekstack.fs.chunkio import ChunkIO
from seekstack.fs.file import File
from seekstack.fs.protocol import ClientPool, RpcError, TransportError, read_token
from seekstack.fs.routing import RoutingCache

META_DEADLINE = 30.0
HEARTBEAT_INTERVAL = 0.5
MUTATING = {"mkdir", "rmdir", "unlink", "symlink", "link", "rename", "setattr", "open", "close", "fsync", "truncate"}


@dataclass(frozen=True)
class StatResult:
    st_ino: int
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime: float
    st_mtime: float
    st_ctime: float

    @classmethod
    def from_dict(cls, d: dict) -> StatResult:
        return cls(d["ino"], d["mode"], d["nlink"], d["uid"], d["gid"], d["size"], d["atime"], d["mtime"], d["ctime"])

    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.st_mode)

    def is_file(self) -> bool:
        return _stat.S_ISREG(self.st_mode)

    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.st_mode)


def _parse_mode(mode: str) -> tuple[bool, bool, bool, bool, bool, bool]:
    """(read, write, create, excl, trunc, append) for an open() mode string; binary only."""
    if not isinstance(mode, str) or not mode or set(mode) - set("rwaxb+") or mode[0] not in "rwax":
        raise ValueError(f"mode: unsupported open mode {mode!r} (binary modes r, w, a, x with optional +)")
    kind, plus = mode[0], "+" in mode
    return (kind == "r" or plus, kind != "r" or plus, kind in "wax", kind == "x", kind == "w", kind == "a")


def _norm(path) -> str:
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be str or PathLike, got {type(path).__name__}")
    if "\0" in path:
        raise ValueError("path: embedded null byte")
    if path.startswith("3fs:"):
        path = path[4:]
    return path if path.startswith("/") or path == "" else "/" + path


class FsClient:
    """A connection to one cluster. See `connect`."""

    def __init__(
        self,
        mgmtd: str,
        token: str,
        uid: int | None = None,
        gid: int | None = None,
        groups: tuple[int, ...] | None = None,
    ):
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.groups = tuple(os.getgroups()) if groups is None and uid is None else tuple(groups or ())
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="seekstack-fs-client", daemon=True)
        self._thread.start()
        self._pool = ClientPool(token)
        self._routing = RoutingCache(mgmtd, self._pool)
        self._io = ChunkIO(self._routing, self._pool)
        self._closed = False
        self.client_id = uuid.uuid4().hex
        self._run(self._routing.refresh(0))
        self._heartbeat = asyncio.run_coroutine_threadsafe(self._heartbeat_loop(), self._loop)
        if self._routing.info["version"] < 0:
            self.close()
            raise ConnectionError(f"cannot reach mgmtd at {mgmtd}")

    # ---------------------------------------------------------------- plumbing
    def _run(self, coro):
        if self._closed:
            coro.close()
            raise ValueError("client is closed")
        if threading.current_thread() is self._thread:
            # Waiting here would wait on ourselves (a File garbage-collected on the loop thread calls close()).
            coro.close()
            raise RuntimeError("blocking client call from the client's own event-loop thread")
        if not self._thread.is_alive():  # e.g. at interpreter shutdown: nothing would ever run the coroutine
            coro.close()
            raise ValueError("client is closed (its event loop is not running)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _meta_nowait(self, method: str, **args) -> None:
        """Send a meta request without waiting for the reply: for close() from a finalizer on the loop thread."""
        if not self._closed:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._ameta(method, **args)))

    async def _heartbeat_loop(self):
        """Tell mgmtd we are alive, so meta keeps our write sessions (it prunes those of silent clients)."""
        while True:
            try:
                await self._routing.mgmtd.call("heartbeat_client", client=self.client_id, timeout=2.0)
            except OSError:
                pass
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _ameta(self, method: str, **args):
        args.setdefault("uid", self.uid)
        args.setdefault("gid", self.gid)
        args.setdefault("groups", list(self.groups))
        if method in MUTATING:
            # One id for all retries of this request: meta applies it once even if a reply was lost.
            args.setdefault("rid", f"{int(time.time()):010x}{uuid.uuid4().hex}")
        end = time.monotonic() + META_DEADLINE
        while True:
            metas = self._routing.info.get("metas") or []
            if metas:
                try:
                    return await self._pool.get(random.choice(metas)).call(method, **args)
                except TransportError:
                    pass  # meta restarting or gone: try again with fresh routing (another instance, or it back)
                except RpcError as e:
                    raise OSError(e.errno, e.strerror, args.get("path") or args.get("src")) from None
            if time.monotonic() > end:
                raise OSError(errno.EHOSTUNREACH, f"{method}: no meta service reachable")
            await asyncio.sleep(0.05)
            await self._routing.refresh(0.05)

    def _meta(self, method: str, **args):
        return self._run(self._ameta(method, **args))

    # ---------------------------------------------------------------- files
    def open(
        self, path, mode: str = "rb", *, perm: int = 0o644, chunk_size: int | None = None, stripe: int | None = None
    ) -> File:
        """Open a file (binary modes). `chunk_size`/`stripe` set the layout of a newly created file."""
        read, write, create, excl, trunc, append = _parse_mode(mode)
        p = _norm(path)
        info = self._meta(
            "open",
            path=p,
            read=read,
            write=write,
            create=create,
            excl=excl,
            trunc=trunc,
            mode=perm,
            chunk_size=chunk_size,
            stripe=stripe,
            client=self.client_id,
        )
        f = File(self, p, info, read, write, append)
        if append:
            f.pos = f.size
        return f

    def read_bytes(self, path) -> bytes:
        with self.open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path, data, **kw) -> int:
        with self.open(path, "wb", **kw) as f:
            return f.write(data)

    # ---------------------------------------------------------------- namespace
    def stat(self, path, follow_symlinks: bool = True) -> StatResult:
        return StatResult.from_dict(self._meta("stat", path=_norm(path), follow=follow_symlinks))

    def lstat(self, path) -> StatResult:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path) -> bool:
        try:
            self.stat(path)
            return True
        except FileNotFoundError:
            return False

    def isdir(self, path) -> bool:
        try:
            return self.stat(path).is_dir()
        except FileNotFoundError:
            return False

    def scandir(self, path="/") -> list[dict]:
        """Entries as {"name", "ino", "type"} (one range scan on meta)."""
        return self._meta("listdir", path=_norm(path))

    def listdir(self, path="/") -> list[str]:
        return [e["name"] for e in self.scandir(path)]

    def mkdir(self, path, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        p = _norm(path)
        if parents:
            parts = [c for c in p.split("/") if c]
            for i in range(1, len(parts)):
                try:
                    self._meta("mkdir", path="/" + "/".join(parts[:i]), mode=mode)
                except FileExistsError:
                    pass
        try:
            self._meta("mkdir", path=p, mode=mode)
        except FileExistsError:
            if not (exist_ok and self.isdir(p)):
                raise

    def makedirs(self, path, mode: int = 0o755, exist_ok: bool = False) -> None:
        self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    def rmdir(self, path) -> None:
        self._meta("rmdir", path=_norm(path))

    def unlink(self, path) -> None:
        self._meta("unlink", path=_norm(path))

    def remove(self, path, recursive: bool = False) -> None:
        """Remove a file, symlink or empty directory (`recursive=True`: a whole tree)."""
        p = _norm(path)
        st = self.lstat(p)
        if not st.is_dir():
            return self.unlink(p)
        if recursive:
            for e in self.scandir(p):
                self.remove(p.rstrip("/") + "/" + e["name"], recursive=True)
        self.rmdir(p)

    def rename(self, src, dst) -> None:
        """Atomic rename; replaces an existing `dst` file or empty directory (POSIX rename)."""
        self._meta("rename", src=_norm(src), dst=_norm(dst))

    replace = rename

    def truncate(self, path, length: int) -> None:
        self._meta("truncate", path=_norm(path), length=int(length))

    def symlink(self, target: str, path) -> None:
        self._meta("symlink", target=target, path=_norm(path))

    def readlink(self, path) -> str:
        return self._meta("readlink", path=_norm(path))

    def link(self, src, dst) -> None:
        self._meta("link", src=_norm(src), dst=_norm(dst))

    def chmod(self, path, mode: int) -> None:
        self._meta("setattr", path=_norm(path), mode=mode)

    def chown(self, path, uid: int | None = None, gid: int | None = None) -> None:
        self._meta("setattr", path=_norm(path), uid=uid, gid=gid)

    def utime(self, path, times: tuple[float, float]) -> None:
        self._meta("setattr", path=_norm(path), atime=times[0], mtime=times[1])

    # ---------------------------------------------------------------- cluster
    def routing(self) -> dict:
        return self._run(self._routing.refresh(0))

    def close(self) -> None:
        if self._closed:
            return
        if getattr(self, "_heartbeat", None) is not None:
            self._loop.call_soon_threadsafe(self._heartbeat.cancel)
        try:
            asyncio.run_coroutine_threadsafe(self._pool.close(), self._loop).result(5)
        except Exception:
            pass
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(
    data_dir: str | os.PathLike | None = None,
    *,
    mgmtd: str | None = None,
    token: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    groups: tuple[int, ...] | None = None,
) -> FsClient:
    """Connect to a cluster: by its data directory (as given to `seekstack fs up --data`; default
    `$SEEKSTACK_FS_DATA`), or by mgmtd address plus cluster token. `uid`/`gid` default to this process's.

    >>> # fs = connect("/tmp/3fs"); fs.mkdir("/d"); fs.listdir("/")  ->  ['d']
    """
    if mgmtd is None or token is None:
        data_dir = data_dir or os.environ.get("SEEKSTACK_FS_DATA")
        if not data_dir:
            raise ValueError("data_dir: give the cluster's data directory, or mgmtd= and token=")
        with open(os.path.join(data_dir, "cluster.json")) as f:
            cfg = json.load(f)
        mgmtd = mgmtd or cfg["mgmtd"]
        token = token or read_token(data_dir)
    return FsClient(mgmtd, token, uid, gid, groups)
