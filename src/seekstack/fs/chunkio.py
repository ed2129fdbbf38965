"""Chunk I/O straight to storage, shared by the client and meta: writes go to the chain head, reads to any serving
replica (the tail when a chunk has a pending version), with retries across routing changes and CRC checks.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time

from seekstack.fs.crc import crc32
from seekstack.fs.meta.layout import Layout, chunk_id, parse_chunk_id
from seekstack.fs.protocol import ClientPool, RpcError
from seekstack.fs.routing import RoutingCache

RETRYABLE = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.ESTALE,
    errno.ESHUTDOWN,
    errno.EAGAIN,
    errno.ENOENT,
}


class ChunkIO:
    def __init__(self, routing: RoutingCache, pool: ClientPool, deadline: float = 60.0):
        self.routing, self.pool, self.deadline = routing, pool, deadline

    async def _retry(self, what: str, attempt):
        """Run `attempt()` until it succeeds, refreshing routing after retryable failures, within the deadline."""
        end = time.monotonic() + self.deadline
        delay = 0.01
        while True:
            try:
                return await attempt()
            except RpcError as e:
                if e.errno not in RETRYABLE or time.monotonic() > end:
                    raise OSError(e.errno, f"{what}: {e.strerror}") from None
            except LookupError:  # no serving target right now
                if time.monotonic() > end:
                    raise OSError(errno.EIO, f"{what}: no serving target") from None
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.2)
            await self.routing.refresh()

    async def write(self, layout: Layout, ino: int, idx: int, offset: int, data: bytes, op: str = "write") -> dict:
        cid, chunk = layout.chain_of(idx), chunk_id(ino, idx)

        async def attempt():
            writers = self.routing.writers(cid)
            if not writers or writers[0]["state"] != "serving" or not writers[0]["addr"]:
                raise LookupError(cid)
            head = writers[0]
            r = await self.pool.get(head["addr"]).call(
                "write",
                data,
                target=head["id"],
                chain=cid,
                chain_ver=self.routing.chain(cid)["version"],
                chunk=chunk,
                op=op,
                offset=offset,
                chunk_size=layout.chunk_size,
            )
            return r

        return await self._retry(f"{op} chunk {chunk}", attempt)

    async def read(self, layout: Layout, ino: int, idx: int, offset: int, length: int) -> bytes:
        """Committed bytes of one chunk range (shorter at the chunk's end; holes read as empty), as a bytes-like
        object (the receive buffer itself, a bytearray, not copied)."""
        return await self._read(layout, ino, idx, offset, length, None)

    async def read_into(self, layout: Layout, ino: int, idx: int, offset: int, dest: memoryview) -> int:
        """Like `read` of `len(dest)` bytes, received straight into `dest` (a writable byte memoryview); returns
        how many bytes the chunk had there (the rest of `dest` is left as it was)."""
        data = await self._read(layout, ino, idx, offset, len(dest), dest)
        n = len(data)
        if n and not (isinstance(data, memoryview) and data.obj is dest.obj):
            dest[:n] = data  # came in a buffer of its own (did not fit, or an old server)
        return n

    async def _read(self, layout: Layout, ino: int, idx: int, offset: int, length: int, dest):
        cid, chunk = layout.chain_of(idx), chunk_id(ino, idx)
        tries = 0

        async def attempt():
            nonlocal tries
            readers = self.routing.readers(cid)
            if not readers:
                raise LookupError(cid)
            # First try: one replica per (file, chain), so the storage readahead of that replica's next chunks of
            # the file pays off for a sequential reader, while the chains of a file (and different files) spread
            # over all replicas. After a pending-version answer or a failure, go to the tail, which commits first.
            t = readers[(ino + cid) % len(readers)] if tries == 0 else readers[-1 - (tries // 2) % len(readers)]
            tries += 1
            meta, data = await self.pool.get(t["addr"]).call_data(
                "read", target=t["id"], chunk=chunk, offset=offset, length=length, into=dest
            )
            crc = meta.get("crc_rx")  # computed while the payload arrived in `dest`
            if crc is None:
                crc = crc32(data)
            if crc != meta["crc"]:
                raise RpcError(errno.EAGAIN, f"checksum mismatch reading {chunk} from target {t['id']}")
            return data

        return await self._retry(f"read chunk {chunk}", attempt)

    async def file_length(self, layout: Layout, ino: int) -> int:
        """The length implied by storage: the max over the stripe's chains of the last chunk's end."""

        async def one(cid):
            async def attempt():
                readers = self.routing.readers(cid)
                if not readers:
                    raise LookupError(cid)
                t = readers[-1]
                r = await self.pool.get(t["addr"]).call(
                    "query_last", target=t["id"], inode=ino, chunk_size=layout.chunk_size
                )
                return r["length"]

            return await self._retry(f"query length of inode {ino}", attempt)

        lens = await asyncio.gather(*(one(c) for c in set(layout.stripe_chains())))
        return max(lens, default=0)

    async def chunks(self, layout: Layout, ino: int) -> list[int]:
        """Indexes of a file's chunks present on storage."""

        async def one(cid):
            async def attempt():
                readers = self.routing.readers(cid)
                if not readers:
                    raise LookupError(cid)
                r = await self.pool.get(readers[-1]["addr"]).call("list_chunks", target=readers[-1]["id"], inode=ino)
                return [parse_chunk_id(c)[1] for c in r["chunks"]]

            return await self._retry(f"list chunks of inode {ino}", attempt)

        out = await asyncio.gather(*(one(c) for c in set(layout.stripe_chains())))
        return sorted(i for part in out for i in part)

    async def trim(self, layout: Layout, ino: int, length: int):
        """Cut a file's chunks to `length` bytes (remove whole chunks past it, truncate the one it ends in)."""
        cs = layout.chunk_size
        jobs = []
        for idx in await self.chunks(layout, ino):
            if idx * cs >= length:
                jobs.append(self.write(layout, ino, idx, 0, b"", op="remove"))
            elif (idx + 1) * cs > length:
                jobs.append(self.write(layout, ino, idx, length - idx * cs, b"", op="truncate"))
        await asyncio.gather(*jobs)

    async def remove_file(self, layout: Layout, ino: int):
        await self.trim(layout, ino, 0)
