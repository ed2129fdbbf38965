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
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

from seekstack.fs.meta.layout import parse_chunk_id
from seekstack.fs.protocol import ClientPool, FileSpan, RpcError, RpcServer, TransportError
from seekstack.fs.routing import SERVING, SYNCING, RoutingCache
from seekstack.fs.storage.engine import ChunkEngine, apply_update
from seekstack.fs.storage.resync import start_resyncs

RETRYABLE = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.ESTALE, errno.ESHUTDOWN, errno.EAGAIN}
FORWARD_DEADLINE = 30.0
IO_THREADS = 8  # chunk files read/written concurrently per storage process (a cold read waits on the disk)
READAHEAD_CHUNKS = 4  # chunks of a file a target starts reading ahead after a read that had to wait on the disk
IO_THREAD_MIN = 64 << 10  # smaller chunk files are written inline: a thread hop costs more than the write


def _looks_cached(fd: int, offset: int, length: int) -> bool:
    """Whether the first and last byte of the range are in the page cache (a probe that copies two bytes), so
    a sendfile on the event loop will most likely not wait on the disk."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return False
    probe = bytearray(1)
    try:
        return os.preadv(fd, [probe], offset, flag) == 1 and os.preadv(fd, [probe], offset + length - 1, flag) == 1
    except OSError:
        return False


_scratch = threading.local()


def _willneed(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:  # superseded and unlinked meanwhile
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _read_in(fd: int, offset: int, length: int) -> None:
    """Bring a range into the page cache, reading it into this I/O thread's reused scratch buffer (the bytes
    themselves then leave with sendfile)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < length:
        buf = _scratch.buf = memoryview(bytearray(length))
    got = 0
    while got < length:
        k = os.preadv(fd, [buf[got:length]], offset + got)
        if k == 0:
            break
        got += k


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
    return data, (zlib.crc32(data) if want_crc else 0)


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
        # (target, inode) -> (last chunk id read, last chunk id read ahead)
        self._ra_done: dict[tuple[int, int], tuple[str, str]] = {}
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
    def _readahead(self, eng: ChunkEngine, tid: int, chunk: str, only_if_started: bool = False) -> None:
        """After a chunk had to come from the disk, ask the kernel to start reading this target's next chunks of
        the same file (posix_fadvise WILLNEED, not waited for): a sequential reader finds them cached. Only the
        page cache changes; what a later read returns is still decided by the metadata at that read."""
        inode, _ = parse_chunk_id(chunk)
        last, done = self._ra_done.get((tid, inode), ("", ""))
        if only_if_started and not (last < chunk <= done):
            return
        if chunk <= last:  # the reader went back (a new pass): what was read ahead may be gone from the cache
            done = ""
        todo = [(c, v) for c, v in eng.next_committed(chunk, READAHEAD_CHUNKS) if c > done]
        if len(self._ra_done) > 4096:
            self._ra_done.clear()
        self._ra_done[(tid, inode)] = (chunk, todo[-1][0] if todo else done)
        if not todo:
            return
        if self._pool_io is not None:
            self._pool_io.submit(_willneed, [eng.version_path(c, v) for c, v in todo])

    async def _io(self, fn, *args):
        """Run blocking file I/O on the node's I/O threads."""
        if self._pool_io is None:
            self._pool_io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix=f"storage{self.node}-io")
        return await asyncio.get_running_loop().run_in_executor(self._pool_io, fn, *args)

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
                writing = None
                if new is not None and len(new) >= IO_THREAD_MIN:
                    # Record the pending version, then write its data file on an I/O thread (the GIL is released)
                    # while the update travels down the chain: the hop's disk write overlaps the successors' work.
                    # Safe because nothing reads a pending version's file, and we commit (and so acknowledge)
                    # only after the file is complete; a crash meanwhile leaves an uncommitted pending version,
                    # which resync replaces.
                    eng.set_pending(chunk, ver, new, chain_ver, crcs[1], written=True)
                    writing = asyncio.ensure_future(self._io(eng.write_version, chunk, ver, new))
                else:
                    eng.set_pending(chunk, ver, new, chain_ver, crcs[1])
                try:
                    try:
                        await self._forward(tid, cid, chunk, ver, op, offset, data, new, chunk_size, full, crcs)
                    finally:
                        if writing is not None:  # settle our own write before an abort may unlink its file
                            await asyncio.wait([writing])
                    if writing is not None:
                        writing.result()  # raises the local write's OSError
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
        offset, length = int(a.get("offset", 0)), int(a.get("length", -1))
        offset = min(max(offset, 0), c.length)
        length = c.length - offset if length < 0 else min(length, c.length - offset)
        # The fd is opened here, in step with the metadata just read, and keeps this version's bytes even if a
        # commit unlinks the file while an I/O thread reads it (so the disk wait does not stall the loop).
        fd = eng.open_version(a["chunk"], c.committed)
        whole = length == c.length
        if whole and length >= IO_THREAD_MIN:
            # A whole chunk goes out with sendfile, from the page cache to the socket (the RPC layer closes the
            # fd); the CRC stored at write time goes with it, so the client still checks disk and wire end to end.
            # Bytes not cached yet are first read in on an I/O thread, so the loop never waits on the disk.
            try:
                if not _looks_cached(fd, offset, length):
                    await self._io(_read_in, fd, offset, length)
                    self._readahead(eng, tid, a["chunk"])
                elif self._ra_done:  # keep a reader that is inside its read-ahead window ahead of the disk
                    self._readahead(eng, tid, a["chunk"], only_if_started=True)
            except BaseException:
                os.close(fd)
                raise
            return {"len": c.length, "crc": c.crc, "exists": True}, FileSpan(fd, offset, length)
        try:
            # Cached bytes are copied right here (RWF_NOWAIT fails instead of waiting on the disk); only a read
            # that would wait goes to an I/O thread, since the thread hop costs more than a cached copy.
            got = _pread_cached(fd, length, offset)
            if got is not None:
                data, crc = got, (0 if whole else zlib.crc32(got))
            else:
                data, crc = await self._io(_pread_crc, fd, length, offset, not whole)
        finally:
            os.close(fd)
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
