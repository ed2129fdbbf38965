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
import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor

from seekstack.fs.crc import crc32
from seekstack.fs.meta.layout import parse_chunk_id
from seekstack.fs.protocol import ClientPool, FileSpan, RpcError, RpcServer, TransportError
from seekstack.fs.routing import SERVING, SYNCING, RoutingCache
from seekstack.fs.storage.blocks import NONE
from seekstack.fs.storage.engine import ChunkEngine, apply_update
from seekstack.fs.storage.resync import start_resyncs

RETRYABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.ESTALE, errno.ESHUTDOWN, errno.EAGAIN}
FORWARD_DEADLINE = 30.0
IO_THREADS = 8  # block writes over INLINE_WRITE_MAX and partial reads that wait on the disk, per storage process
INLINE_WRITE_MAX = 1 << 20  # block writes up to this size run on the event loop (see _write_and_forward)
SENDFILE_MIN = 64 << 10  # whole chunks from this size leave with sendfile; smaller ones with one copy (cheaper)
OVERLAP_MIN = 64 << 10  # from this size a hop sends the update on before writing its own block (overlap)


def _pread_cached(fd: int, length: int, offset: int):
    """The bytes if the page cache holds all of them, else None (without waiting on the disk)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or length == 0:
        return None
    buf = bytearray(length)
    try:
        got = os.preadv(fd, [buf], offset, flag)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT on this file system
        return None
    return buf if got == length else None


def _pread_crc(fd: int, length: int, offset: int, want_crc: bool):
    """Read `length` bytes at `offset` (fewer at EOF) and, if asked, their CRC32 — both with the GIL released."""
    buf = bytearray(length)
    mv, got = memoryview(buf), 0
    while got < length:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            break
        got += k
    data = buf if got == length else buf[:got]
    return data, (crc32(data) if want_crc else 0)


class _ChunkLock:
    """`async with` on one chunk's entry of `locks` ({chunk: [asyncio.Lock, users]}). A plain class rather than an
    asynccontextmanager: this runs on every chunk update of every hop, and the generator machinery cost more."""

    __slots__ = ("locks", "chunk", "entry")

    def __init__(self, locks: dict, chunk: str):
        self.locks, self.chunk = locks, chunk
        entry = locks.get(chunk)
        if entry is None:
            entry = locks[chunk] = [asyncio.Lock(), 0]
        self.entry = entry

    async def __aenter__(self):
        self.entry[1] += 1
        try:
            await self.entry[0].acquire()
        except BaseException:
            self._unref()
            raise

    async def __aexit__(self, *exc):
        self.entry[0].release()
        self._unref()

    def _unref(self):
        self.entry[1] -= 1
        if self.entry[1] == 0 and self.locks.get(self.chunk) is self.entry:
            del self.locks[self.chunk]


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
        self._pool_io: ThreadPoolExecutor | None = None
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
    def _io_pool(self) -> ThreadPoolExecutor:
        if self._pool_io is None:
            self._pool_io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix=f"storage{self.node}-io")
        return self._pool_io

    async def _io(self, fn, *args):
        """Run blocking file I/O on the node's I/O threads."""
        return await asyncio.get_running_loop().run_in_executor(self._io_pool(), fn, *args)

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
                crcs = (base, crc32(new) if new is not None else 0)
            else:
                # The update applied to the verified base (or the whole chunk) is deterministic, so the head's CRC
                # of the result is ours too: only the head makes a pass over the bytes.
                crcs = (base, new_crc)
            for _ in range(8):
                big = new is not None and len(new) >= OVERLAP_MIN
                blk = eng.set_pending(chunk, ver, new, chain_ver, crcs[1], write=not big)
                try:
                    if big:
                        await self._write_and_forward(
                            eng, blk, new, tid, cid, chunk, ver, op, offset, data, chunk_size, full, crcs
                        )
                    else:
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

    async def _write_and_forward(self, eng, blk, new, tid, cid, chunk, ver, op, offset, data, chunk_size, full, crcs):
        """Write our replica's block while the update travels down the chain, so the hop's disk write overlaps
        the successors' work. Safe because nothing reads a pending version's block, and we commit (and so
        acknowledge) only after the block is written; a crash meanwhile leaves an uncommitted pending version,
        which resync replaces.

        Blocks up to INLINE_WRITE_MAX are written on the event loop once the update is sent on: with O_DIRECT a
        write costs ~0.1 ms of CPU per MiB, and handing 1 MiB writes to a thread made the write path ~15 % more
        CPU for no gain. Larger ones go to an I/O thread: a 4 MiB write holds the disk ~2.5 ms, and a loop
        blocked that long delayed the other chains' updates through this node (10 % slower writes)."""
        args = (tid, cid, chunk, ver, op, offset, data, new, chunk_size, full, crcs)
        if len(new) > INLINE_WRITE_MAX:
            writing = asyncio.get_running_loop().run_in_executor(self._io_pool(), eng.write_block, blk, new)
            try:
                await self._forward(*args)
            finally:
                if not writing.done():  # settle our write before the caller may abort (free) its block
                    await asyncio.wait([writing])  # (wait: a cancel of ours must not cancel the write)
            writing.result()  # raises the local write's OSError
            return
        writers = self.routing.writers(cid)
        if not writers or writers[-1]["id"] == tid:  # the tail (or no routing): write, then nothing to forward
            eng.write_block(blk, new)
            return await self._forward(*args)
        fwd = asyncio.ensure_future(self._forward(*args))
        try:
            await asyncio.sleep(0)  # the forward goes out first (one loop pass: the socket takes the whole chunk)
        except BaseException:
            fwd.cancel()
            raise
        try:
            eng.write_block(blk, new)
        except BaseException:
            await asyncio.wait([fwd])  # settle the forward before the caller aborts our pending version
            if not fwd.cancelled():
                fwd.exception()  # retrieved: the local write's error is the one reported
            raise
        await fwd

    def _lock(self, chunk: str) -> _ChunkLock:
        """The per-chunk lock (`async with`); entries are dropped when nobody holds or waits for them."""
        return _ChunkLock(self.locks, chunk)

    # ---------------------------------------------------------------- RPC handlers
    async def h_write(self, a, payload):
        chain = await self._check_version(a["chain"], a["chain_ver"])
        writers = [t for t in chain["targets"] if t["state"] in (SERVING, SYNCING)]
        if not writers or writers[0]["id"] != a["target"] or writers[0]["state"] != SERVING:
            raise stale(f"target {a['target']} is not the head of chain {a['chain']}")
        return await self._apply_request(a, payload, head=True)

    async def h_forward(self, a, payload):
        return await self._apply_request(a, payload, head=False)

    def _apply_request(self, a, payload, head: bool):
        """A write (`head`: the chain's head picks the version) or a forwarded update, from its request fields."""
        return self._apply_and_forward(
            a["target"],
            a["chain"],
            a["chain_ver"],
            a["chunk"],
            a["op"],
            a.get("offset", 0),
            payload,
            a["chunk_size"],
            None if head else a["ver"],
            False if head else a["full"],
            False if head else a.get("remove", False),
            0 if head else a.get("base_crc", 0),
            0 if head else a.get("new_crc", 0),
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
            return {"len": 0, "crc": crc32(b""), "exists": False}, b""
        if c.pending and not a.get("relaxed"):
            raise OSError(errno.EAGAIN, f"chunk {a['chunk']} has a pending version")
        offset, length = int(a.get("offset", 0)), int(a.get("length", -1))
        offset = min(max(offset, 0), c.length)
        length = c.length - offset if length < 0 else min(length, c.length - offset)
        if c.blk == NONE:  # empty content has no block
            return {"len": 0, "crc": crc32(b""), "exists": True}, b""
        # The block is held from here, in step with the metadata just read: a commit meanwhile cannot hand it to
        # another write while sendfile or an I/O thread still reads it.
        fd, base = eng.hold(c)
        blk = c.blk
        whole = length == c.length
        if whole and length >= SENDFILE_MIN:
            # A whole chunk goes out with sendfile, from the page cache to the socket (the RPC layer releases the
            # block once sent); the CRC stored at write time goes with it, so the client still checks disk and
            # wire end to end. Straight from the event loop even when the bytes are not cached yet: a file's
            # chunks on a target mostly lie back to back in one block file, so the kernel's read-ahead on it
            # streams them, and the loop rarely waits long. Measured on cold reads: reading misses in on an I/O
            # thread first was 5-15 % slower, and an explicit WILLNEED window ~20 % slower (it queued ahead of
            # the reader's own misses and stopped the kernel's read-ahead).
            span = FileSpan(fd, base + offset, length, release=lambda: eng.release(blk))
            return {"len": c.length, "crc": c.crc, "exists": True}, span
        try:
            # Cached bytes are copied right here (RWF_NOWAIT fails instead of waiting on the disk); only a read
            # that would wait goes to an I/O thread, since the thread hop costs more than a cached copy.
            got = _pread_cached(fd, length, base + offset)
            if got is not None:
                data, crc = got, (0 if whole else crc32(got))
            else:
                data, crc = await self._io(_pread_crc, fd, length, base + offset, not whole)
        finally:
            eng.release(blk)
        # A whole-chunk read returns the CRC stored at write time, so the client's check covers the disk as well
        # as the wire (and we skip a pass over the bytes); a partial read gets the CRC of its slice.
        return {"len": c.length, "crc": c.crc if whole else crc, "exists": True}, data

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
