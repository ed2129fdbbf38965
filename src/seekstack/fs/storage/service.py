"""Storage service: chunk engines for this node's targets, the CRAQ write path, reads, and resync.

Write path (3FS's CRAQ variant): the client sends to the chain head; each hop checks the request's chain version,
takes the per-chunk lock, stores pending version u = committed + 1, forwards to its successor, and commits when the
successor acks (the tail commits at once). A successor that fails is retried with fresh routing until mgmtd has
moved it out of the way. Syncing targets (write-only) receive full-chunk replaces so they never depend on their
own possibly stale copy. Reads are served by any serving target from the committed version; a chunk with a pending
version answers EAGAIN and the client asks the tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
import zlib

from seekstack.fs.meta.layout import parse_chunk_id
from seekstack.fs.protocol import ClientPool, RpcError, RpcServer, TransportError
from seekstack.fs.routing import SERVING, SYNCING, RoutingCache
from seekstack.fs.storage.engine import ChunkEngine, apply_update
from seekstack.fs.storage.resync import start_resyncs

RETRYABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.ESTALE, errno.ESHUTDOWN, errno.EAGAIN}
FORWARD_DEADLINE = 30.0


def stale(msg: str) -> OSError:
    return OSError(errno.ESTALE, msg)


class StorageNode:
    def __init__(self, data_dir: str, node: int, token: str, mgmtd_addr: str, host: str = "127.0.0.1"):
        self.dir = os.path.join(data_dir, f"storage{node}")
        os.makedirs(self.dir, exist_ok=True)
        self.node, self.token, self.host = node, token, host
        self.pool = ClientPool(token)
        self.routing = RoutingCache(mgmtd_addr, self.pool)
        self.engines: dict[int, ChunkEngine] = {}
        self.insync: dict[int, bool] = {}
        self.locks: dict[str, list] = {}
        self.lease, self.last_ok = 2.0, time.monotonic()
        self.resyncing: dict[int, asyncio.Task] = {}  # syncing target id -> the task resyncing it
        handlers = {
            "write": self.h_write,
            "forward": self.h_forward,
            "read": self.h_read,
            "query_last": self.h_query_last,
            "dump_meta": self.h_dump_meta,
            "sync_replace": self.h_sync_replace,
            "sync_done": self.h_sync_done,
            "list_chunks": self.h_list_chunks,
            "ping": self.h_ping,
        }
        self.server = RpcServer(handlers, token, gate=self._gate)

    # ---------------------------------------------------------------- membership
    def _gate(self, method: str):
        # A node that could not renew its lease must assume mgmtd is replacing it, so it stops serving (reads
        # could be stale) — after half a lease, before mgmtd, which waits a whole lease, can have moved on.
        if method != "ping" and time.monotonic() - self.last_ok > self.lease / 2:
            raise OSError(errno.ESHUTDOWN, f"storage node {self.node}: lease expired")

    async def _register(self):
        addr = f"{self.host}:{self.server.port}"
        while True:
            try:
                r = await self.routing.mgmtd.call("register", node=self.node, addr=addr)
                break
            except TransportError:
                await asyncio.sleep(0.1)  # mgmtd not up yet
        self.lease = r["lease"]
        for t in r["targets"]:
            self.engines[t] = ChunkEngine(os.path.join(self.dir, f"target{t}"))
            self.insync[t] = r["first"]
        self.routing.set(r["routing"])
        self.last_ok = time.monotonic()

    def _start_resyncs(self):
        start_resyncs(self)

    def _observe(self):
        """Track our targets' public states: serving means in sync; offline/lastsrv/waiting means not."""
        for c in self.routing.info["chains"].values():
            for t in c["targets"]:
                if t["id"] in self.insync:
                    if t["state"] == SERVING:
                        self.insync[t["id"]] = True
                    elif t["state"] != SYNCING:
                        self.insync[t["id"]] = False

    async def _heartbeat_loop(self):
        interval = max(0.02, self.lease / 10)
        while True:
            try:
                local = {str(t): ("uptodate" if ok else "online") for t, ok in self.insync.items()}
                sent = time.monotonic()  # the lease runs from when mgmtd can have seen us at the earliest
                r = await self.routing.mgmtd.call("heartbeat", node=self.node, targets=local, timeout=self.lease)
                self.last_ok = sent
                if r["version"] != self.routing.info["version"]:
                    await self.routing.refresh(0)
                self._observe()
                self._start_resyncs()  # also retries a resync that failed
            except RpcError:
                pass
            await asyncio.sleep(interval)

    async def run(self, port: int, ready=None):
        await self.server.start(self.host, port)
        await self._register()
        self._observe()
        if ready:
            ready(self.server.port)
        self._start_resyncs()
        await self._heartbeat_loop()

    # ---------------------------------------------------------------- helpers
    def _engine(self, target: int) -> ChunkEngine:
        eng = self.engines.get(int(target))
        if eng is None:
            raise OSError(errno.ENOENT, f"target {target} is not on storage node {self.node}")
        return eng

    async def _check_version(self, cid: int, ver: int) -> dict:
        chain = self.routing.chain(cid)
        if ver > chain["version"]:
            await self.routing.refresh(0)
            chain = self.routing.chain(cid)
        if ver != chain["version"]:
            raise stale(f"chain {cid} version {ver} != {chain['version']}")
        return chain

    async def _forward(
        self,
        me: int,
        cid: int,
        chunk: str,
        ver: int,
        op: str,
        offset: int,
        data: bytes,
        new: bytes | None,
        chunk_size: int,
        full: bool,
        crcs: tuple[int, int],
    ):
        """Forward an update to the successor, retrying with fresh routing until it accepts or we are the tail.
        `crcs` = (CRC of the content the update applies to, CRC of the result) lets the successor verify its base."""
        deadline = time.monotonic() + FORWARD_DEADLINE
        while True:
            writers = self.routing.writers(cid)
            ids = [t["id"] for t in writers]
            if me not in ids:
                raise stale(f"target {me} no longer takes writes on chain {cid}")
            i = ids.index(me)
            if i == len(ids) - 1:
                return
            succ = writers[i + 1]
            send_full = full or succ["state"] == SYNCING
            try:
                await self.pool.get(succ["addr"]).call(
                    "forward",
                    (new or b"") if send_full else data,
                    target=succ["id"],
                    chain=cid,
                    chain_ver=self.routing.chain(cid)["version"],
                    chunk=chunk,
                    ver=ver,
                    op=op,
                    offset=offset,
                    full=send_full,
                    remove=new is None,
                    chunk_size=chunk_size,
                    base_crc=crcs[0],
                    new_crc=crcs[1],
                    timeout=10.0,
                )
                return
            except RpcError as e:
                if e.errno not in RETRYABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
                await self.routing.refresh()

    async def _apply_and_forward(
        self,
        tid: int,
        cid: int,
        chain_ver: int,
        chunk: str,
        op: str,
        offset: int,
        data: bytes,
        chunk_size: int,
        ver: int | None,
        full: bool,
        remove: bool,
        base_crc: int = 0,
        new_crc: int = 0,
    ):
        eng = self._engine(tid)
        async with self._lock(chunk):
            await self._check_version(cid, chain_ver)
            cur = eng.get(chunk)
            committed = cur.committed if cur else 0
            head = ver is None
            if head:  # the head serializes writes and picks the version
                ver = committed + 1
            elif not full and (committed != ver - 1 or (cur is not None and cur.crc != base_crc)):
                if committed == ver and cur.crc == new_crc:
                    return {"ver": committed, "crc": cur.crc}  # already applied (a re-forward after a failure)
                # Our copy is not the base this update was computed on (an attempt the head aborted may have
                # committed here): ask for the full chunk, at a version above ours.
                raise OSError(errno.EOVERFLOW, f"diverged at version:{committed}")
            if full:
                new = None if remove else data
                if committed > ver or (committed == ver and cur.crc != new_crc):
                    raise OSError(errno.EOVERFLOW, f"diverged at version:{committed}")
            else:
                covers = op == "write" and offset == 0 and (cur is None or len(data) >= cur.length)
                old = b"" if covers or cur is None or not cur.committed else eng.read(chunk)
                new = apply_update(old, op, offset, data, chunk_size)
            base = cur.crc if cur is not None and cur.committed else 0
            if head:
                crcs = (base, zlib.crc32(new) if new is not None else 0)
            else:
                # The update applied to the verified base (or the whole chunk) is deterministic, so the head's CRC
                # of the result is ours too: only the head makes a pass over the bytes.
                crcs = (base, new_crc)
            for _ in range(8):
                eng.set_pending(chunk, ver, new, chain_ver, crcs[1])
                try:
                    await self._forward(tid, cid, chunk, ver, op, offset, data, new, chunk_size, full, crcs)
                except RpcError as e:
                    eng.abort(chunk, ver)
                    if head and e.errno == errno.EOVERFLOW:  # resend the whole chunk above the successor's version
                        ver, full = max(ver, int(e.strerror.rsplit(":", 1)[1])) + 1, True
                        continue
                    raise
                except BaseException:
                    eng.abort(chunk, ver)
                    raise
                eng.commit(chunk, ver)
                return {"ver": ver, "crc": crcs[1], "len": len(new or b"")}
            raise OSError(errno.EIO, f"chunk {chunk}: replicas keep diverging")

    @contextlib.asynccontextmanager
    async def _lock(self, chunk: str):
        """The per-chunk lock; entries are dropped when nobody holds or waits for them."""
        entry = self.locks.get(chunk)
        if entry is None:
            entry = self.locks[chunk] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self.locks.pop(chunk, None)

    # ---------------------------------------------------------------- RPC handlers
    async def h_write(self, a, payload):
        chain = await self._check_version(a["chain"], a["chain_ver"])
        writers = [t for t in chain["targets"] if t["state"] in (SERVING, SYNCING)]
        if not writers or writers[0]["id"] != a["target"] or writers[0]["state"] != SERVING:
            raise stale(f"target {a['target']} is not the head of chain {a['chain']}")
        return await self._apply_and_forward(
            a["target"],
            a["chain"],
            a["chain_ver"],
            a["chunk"],
            a["op"],
            a.get("offset", 0),
            payload,
            a["chunk_size"],
            None,
            False,
            False,
        )

    async def h_forward(self, a, payload):
        return await self._apply_and_forward(
            a["target"],
            a["chain"],
            a["chain_ver"],
            a["chunk"],
            a["op"],
            a.get("offset", 0),
            payload,
            a["chunk_size"],
            a["ver"],
            a["full"],
            a.get("remove", False),
            a.get("base_crc", 0),
            a.get("new_crc", 0),
        )

    def _serving(self, tid: int):
        for c in self.routing.info["chains"].values():
            for t in c["targets"]:
                if t["id"] == tid:
                    if t["state"] != SERVING or not self.insync.get(tid):
                        raise stale(f"target {tid} is {t['state']}, not serving reads")
                    return
        raise OSError(errno.ENOENT, f"target {tid} unknown")

    async def h_read(self, a, payload):
        tid = int(a["target"])
        self._serving(tid)
        eng = self._engine(tid)
        c = eng.get(a["chunk"])
        if c is None or c.committed == 0:
            if c is not None and c.pending and not a.get("relaxed"):
                raise OSError(errno.EAGAIN, f"chunk {a['chunk']} has a pending version")
            return {"len": 0, "crc": zlib.crc32(b""), "exists": False}, b""
        if c.pending and not a.get("relaxed"):
            raise OSError(errno.EAGAIN, f"chunk {a['chunk']} has a pending version")
        data = eng.read(a["chunk"], int(a.get("offset", 0)), int(a.get("length", -1)), ver=c.committed)
        # A whole-chunk read returns the CRC stored at write time, so the client's check covers the disk as well
        # as the wire (and we skip a pass over the bytes); a partial read gets the CRC of its slice.
        crc = c.crc if len(data) == c.length else zlib.crc32(data)
        return {"len": c.length, "crc": crc, "exists": True}, data

    async def h_query_last(self, a, payload):
        """Length implied by a file's chunks on this target: max(index * chunk_size + chunk length)."""
        tid = int(a["target"])
        self._serving(tid)
        best = 0
        for cid, n in self._engine(tid).chunks_of(int(a["inode"])):
            _, idx = parse_chunk_id(cid)
            best = max(best, idx * int(a["chunk_size"]) + n)
        return {"length": best}

    async def h_list_chunks(self, a, payload):
        return {"chunks": [c for c, _ in self._engine(int(a["target"])).chunks_of(int(a["inode"]))]}

    async def h_dump_meta(self, a, payload):
        return {"chunks": self._engine(int(a["target"])).dump()}

    async def h_sync_replace(self, a, payload):
        self._engine(int(a["target"])).replace(
            a["chunk"], a["ver"], None if a.get("remove") else payload, a["chain_ver"]
        )
        return {}

    async def h_sync_done(self, a, payload):
        self.insync[int(a["target"])] = True
        return {}

    async def h_ping(self, a, payload):
        return {"node": self.node, "targets": sorted(self.engines)}
