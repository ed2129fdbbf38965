"""How a batch of prepared I/Os is executed: straight on a `seekstack.fs` client's event loop, or on threads.

A `seekstack.fs` file (from `FsClient.open`) carries its layout, so a batch of reads becomes one coroutine per chunk
span on the client's own loop: every read of the batch is in flight at once, and each chunk's bytes are copied from
the socket payload straight into the caller's Iov slice (no intermediate buffer). Writes, and any other file object
(a `LocalDirClient` file, a plain Python file), run on a thread pool through `pwrite`/`preadinto`/`readinto`/`pread`
(the client is thread-safe, so those are in flight together too).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


def _errno_of(e: BaseException) -> int:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, ValueError):
        return errno.EINVAL
    return errno.EIO


def has_chunk_path(f) -> bool:
    """True for a `seekstack.fs.File`: we can drive its chunks on the client's loop ourselves."""
    client = getattr(f, "_client", None)
    return (
        hasattr(f, "layout")
        and hasattr(f, "ino")
        and hasattr(client, "_loop")
        and hasattr(getattr(client, "_io", None), "read")
    )


async def aread_into(f, mv: memoryview, offset: int) -> int:
    """Read `len(mv)` bytes of `f` at `offset` into `mv` (short at EOF; holes read as zeros)."""
    from seekstack.fs.meta.layout import chunk_spans

    length = max(0, min(len(mv), f.size - offset))

    async def one(idx, off, n, boff):
        data = await f._client._io.read(f.layout, f.ino, idx, off, n)
        got = len(data)
        mv[boff : boff + got] = data
        if got < n:
            mv[boff + got : boff + n] = bytes(n - got)

    await asyncio.gather(*(one(*s) for s in chunk_spans(offset, length, f.layout.chunk_size)))
    return length


def sync_io(f, read: bool, mv: memoryview, offset: int) -> int:
    """The thread-pool path: one read or write through the file's own methods."""
    if not read:
        return f.pwrite(mv, offset)
    if hasattr(f, "preadinto"):
        return f.preadinto(mv, offset)
    if hasattr(f, "pread"):
        data = f.pread(len(mv), offset)
    else:  # a plain Python file: positioned read through seek + readinto
        f.seek(offset)
        return f.readinto(mv)
    mv[: len(data)] = data
    return len(data)


class Executor:
    """Runs batches of `(file, read, view, offset, done)` jobs; `done(result)` gets bytes moved or -errno."""

    def __init__(self, workers: int = 16):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def run(self, jobs: list[tuple[object, bool, memoryview, int, Callable[[int], None]]]) -> None:
        by_loop: dict[int, list] = {}
        for job in jobs:
            f = job[0]
            if job[1] and has_chunk_path(f):  # writes use the file's own pwrite: it keeps the file's bookkeeping
                by_loop.setdefault(id(f._client._loop), []).append(job)
            else:
                self._threaded(job)
        for group in by_loop.values():
            loop = group[0][0]._client._loop
            asyncio.run_coroutine_threadsafe(self._batch(group), loop)

    async def _batch(self, group):
        async def one(f, read, mv, offset, done):
            try:
                n = await aread_into(f, mv, offset)
            except Exception as e:  # the error goes into the completion, like a -errno cqe
                n = -_errno_of(e)
            done(n)

        await asyncio.gather(*(one(*job) for job in group))

    def _threaded(self, job):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="usrbio")
        f, read, mv, offset, done = job

        def work():
            try:
                n = sync_io(f, read, mv, offset)
            except Exception as e:
                n = -_errno_of(e)
            done(n)

        self._pool.submit(work)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
