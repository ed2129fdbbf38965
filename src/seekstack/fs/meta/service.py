"""The meta service process: RPC front of `MetaStore`, plus the storage side effects (length settling on close and
fsync, trimming on truncate, chunk removal for deleted files). Stateless: any number can share one KV store.
"""

from __future__ import annotations

import asyncio
import time

from seekstack.fs.chunkio import ChunkIO
from seekstack.fs.kv import open_store
from seekstack.fs.meta.layout import Layout
from seekstack.fs.meta.store import MetaStore, User
from seekstack.fs.protocol import ClientPool, RpcServer
from seekstack.fs.routing import RoutingCache


def _user(a: dict) -> User:
    return User(int(a.get("uid", 0)), int(a.get("gid", 0)), tuple(a.get("groups", ())))


class MetaService:
    def __init__(
        self,
        kv_url: str,
        token: str,
        mgmtd_addr: str,
        host: str = "127.0.0.1",
        chunk_size: int = 1 << 20,
        stripe: int = 0,
        root_owner: tuple[int, int] = (0, 0),
        client_timeout: float = 10.0,
    ):
        self.token, self.host, self.root_owner = token, host, root_owner
        self.client_timeout = client_timeout
        self.pool = ClientPool(token)
        self.routing = RoutingCache(mgmtd_addr, self.pool)
        self.io = ChunkIO(self.routing, self.pool)
        self.kv_url, self.chunk_size, self.stripe = kv_url, chunk_size, stripe
        self.store: MetaStore | None = None
        self._gc_tasks: set[asyncio.Task] = set()
        names = [
            "stat",
            "listdir",
            "readlink",
            "mkdir",
            "rmdir",
            "unlink",
            "symlink",
            "link",
            "rename",
            "setattr",
            "open",
            "close",
            "fsync",
            "truncate",
        ]
        self.server = RpcServer({n: getattr(self, "h_" + n) for n in names}, token)

    async def _call(self, fn, *args, **kw):
        return await asyncio.to_thread(fn, *args, **kw)

    async def _mutate(self, a: dict, fn, *args, **kw):
        """A mutating call, applied at most once per client request id (`a["rid"]`)."""
        return await asyncio.to_thread(self.store.with_request, a.get("rid"), fn, *args, **kw)

    def _gc(self, inode: dict | None):
        """Remove a deleted file's chunks in the background (best effort: a failure leaves orphan chunks)."""
        if inode and inode.get("layout"):
            t = asyncio.create_task(self.io.remove_file(Layout.from_dict(inode["layout"]), inode["id"]))
            self._gc_tasks.add(t)
            t.add_done_callback(self._gc_tasks.discard)

    # ---------------------------------------------------------------- handlers
    async def _read(self, fn, *args):
        # SQLite reads in WAL mode never wait for writers and take microseconds: run them on the loop rather than
        # paying a thread hop. Other stores (a network round trip) go to a thread like writes do.
        if self.kv_url.startswith("sqlite"):
            return fn(*args)
        return await self._call(fn, *args)

    async def h_stat(self, a, p):
        if "ino" in a:
            return await self._read(self.store.stat_ino, int(a["ino"]))
        return await self._read(self.store.stat, a["path"], _user(a), a.get("follow", True))

    async def h_listdir(self, a, p):
        return await self._read(self.store.listdir, a["path"], _user(a))

    async def h_readlink(self, a, p):
        return await self._read(self.store.readlink, a["path"], _user(a))

    async def h_mkdir(self, a, p):
        return await self._mutate(a, self.store.mkdir, a["path"], int(a.get("mode", 0o755)), _user(a))

    async def h_rmdir(self, a, p):
        return await self._mutate(a, self.store.rmdir, a["path"], _user(a))

    async def h_unlink(self, a, p):
        self._gc(await self._mutate(a, self.store.unlink, a["path"], _user(a)))
        return {}

    async def h_symlink(self, a, p):
        return await self._mutate(a, self.store.symlink, a["target"], a["path"], _user(a))

    async def h_link(self, a, p):
        return await self._mutate(a, self.store.link, a["src"], a["dst"], _user(a))

    async def h_rename(self, a, p):
        self._gc(await self._mutate(a, self.store.rename, a["src"], a["dst"], _user(a)))
        return {}

    async def h_setattr(self, a, p):
        kw = {k: a.get(k) for k in ("mode", "uid", "gid", "atime", "mtime")}
        return await self._mutate(a, self.store.setattr, a["path"], _user(a), follow=a.get("follow", True), **kw)

    async def h_open(self, a, p):
        flags = {k: bool(a.get(k, False)) for k in ("read", "write", "create", "excl", "trunc")}
        r = await self._mutate(
            a,
            self.store.open,
            a["path"],
            _user(a),
            mode=int(a.get("mode", 0o644)),
            chunk_size=a.get("chunk_size"),
            stripe=a.get("stripe"),
            client=a.get("client", ""),
            **flags,
        )
        if r["trunc_from"]:
            await self.io.trim(Layout.from_dict(r["layout"]), r["stat"]["ino"], 0)
        return r

    async def _settle(self, ino: int, layout: dict, floor: int) -> int:
        """The precise length: what storage holds, or more if the file was extended by truncate (a sparse tail)."""
        stored = await self.io.file_length(Layout.from_dict(layout), ino)
        return max(stored, floor)

    async def h_close(self, a, p):
        ino = int(a["ino"])
        length = None
        if a.get("session") and a.get("wrote", True):  # a writer that wrote nothing has no length to settle
            st = await self._call(self.store.stat_ino, ino)
            length = await self._settle(ino, a["layout"], max(st["size"], int(a.get("length_hint", 0))))
        self._gc(await self._mutate(a, self.store.close, ino, a.get("session"), length))
        return {"size": length}

    async def h_fsync(self, a, p):
        ino = int(a["ino"])
        st = await self._call(self.store.stat_ino, ino)
        length = await self._settle(ino, a["layout"], max(st["size"], int(a.get("length_hint", 0))))
        return await self._mutate(a, self.store.set_length, ino, length)

    async def h_truncate(self, a, p):
        length = int(a["length"])
        session = (int(a["ino"]), a["session"]) if a.get("session") else None
        inode, old = await self._mutate(a, self.store.truncate, a.get("path", ""), length, _user(a), session)
        if length < old or length == 0:
            await self.io.trim(Layout.from_dict(inode["layout"]), inode["id"], length)
        return {"size": length}

    async def prune_sessions(self) -> int:
        """Close the write sessions of clients that stopped heartbeating to mgmtd (crashed): their files get a
        length settled from storage, and files unlinked while they had them open are finally removed."""
        r = await self.routing.mgmtd.call("live_clients", within=self.client_timeout)
        if r["uptime"] < self.client_timeout:
            return 0  # mgmtd restarted recently and cannot know yet who is alive
        live, now, pruned = set(r["clients"]), time.time(), 0
        for s in await self._call(self.store.all_sessions):
            if s["client"] in live or now - s["ts"] < self.client_timeout:
                continue
            layout = await self._call(self.store.layout_of, s["ino"])
            if layout is None:
                await self._call(self.store.close, s["ino"], s["session"], None)
            else:
                await self.h_close({"ino": s["ino"], "session": s["session"], "layout": layout}, b"")
            pruned += 1
        return pruned

    async def _prune_loop(self):
        while True:
            await asyncio.sleep(max(0.2, self.client_timeout / 4))
            try:
                await self.prune_sessions()
                await self._call(self.store.prune_requests)
            except OSError:
                pass  # mgmtd or storage unreachable: try again next round
            except Exception:  # a bug must not stop pruning for good; leave a trace in the log
                import traceback

                traceback.print_exc()

    # ---------------------------------------------------------------- lifecycle
    async def run(self, port: int, ready=None):
        await self.routing.refresh(0)
        while not self.routing.info["chains"]:
            await asyncio.sleep(0.1)
            await self.routing.refresh(0)
        url = self.kv_url
        self.store = await asyncio.to_thread(
            MetaStore,
            open_store(url),
            chains=self.routing.chain_ids,
            chunk_size=self.chunk_size,
            stripe=self.stripe,
            root_owner=self.root_owner,
        )
        await self.server.start(self.host, port)
        addr = f"{self.host}:{self.server.port}"
        if ready:
            ready(self.server.port)
        self._pruner = asyncio.create_task(self._prune_loop())
        while True:
            try:
                r = await self.routing.mgmtd.call("heartbeat_meta", addr=addr, timeout=2.0)
                if r["version"] != self.routing.info["version"]:
                    await self.routing.refresh(0)
            except OSError:
                pass
            await asyncio.sleep(0.1)
