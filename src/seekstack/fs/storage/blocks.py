"""Block files of one storage target: chunk data lives in fixed-size blocks of a few large files, as in 3FS's chunk
engine (one file per power-of-two block size, free blocks kept in memory), not in a file per chunk version.

Why not a file per version: creating and deleting an inode per chunk write cost ~13 % of the whole write path's
CPU on ext4 (inode bitmap scans), and every read paid an open and a close. Here a chunk version is a block
(`loc`), allocated on the event-loop thread and written from any thread with `pwrite`.

Aligned payloads go to the disk with O_DIRECT, as 3FS's engine does: no page-cache copy and no dirty pages left for
a later flush (on the benchmark VM a buffered write into fresh page-cache pages cost 0.3-3 ms of CPU per MiB, as the
hypervisor faults the pages in, a direct write ~0.1 ms). Other payloads are written through the page cache with
writeback started at once (`sync_file_range`), so an `fsync`/`syncfs` later finds little left to flush.

A block a reader holds (`hold`/`release`, e.g. while `sendfile` streams it) is not reused until released, so a
read always sees the version it started on even if a commit frees the block meanwhile.

Freed blocks give their disk space back, as 3FS's punch-hole worker does: a block left free for `punch_delay`
seconds (`PUNCH_DELAY`) is punched out of its file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, on a background thread:
with the `discard` mount option of the benchmark VM a 4 MiB punch takes ~1 ms, too long for the event loop), and a
file whose last blocks are punched is truncated. Free blocks therefore come in three states: *dirty* (freed, bytes
still on disk; reused first, newest first, and a reuse cancels the punch), *punching* (handed to the thread, not
reusable until it is done) and *clean* (a hole; reused lowest index first, so the files' tails empty out). The
delay keeps overwrites cheap: an overwrite's fresh block is one its predecessor freed a moment ago, and an O_DIRECT
write into a hole costs ~30 % more than one into allocated blocks (2.55 vs 1.92 ms per 4 MiB measured). Crash
safety comes from the callers: they free a block only after the metadata commit that stops naming it, so a kill -9
before the punch leaves a free block with stale bytes, freed (and punched) again at start-up.

>>> import tempfile
>>> bf = BlockFiles(tempfile.mkdtemp())
>>> loc = bf.allocate(3)
>>> bf.write(loc, b"abc")
>>> bf.read(loc, 0, 3)
b'abc'
>>> bf.free(loc)
>>> bf.reclaim()  # no event loop here: punch now (an event loop does this in the background)
4096
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import heapq
import logging
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

MIN_SHIFT = 12  # 4 KiB: the smallest block, and the alignment of direct I/O (offsets, lengths, buffers)
ALIGN = 1 << MIN_SHIFT
NONE = -1  # the location of empty content: no block
_INDEX_BITS = 40
_NAME = re.compile(r"^k(\d+)\.blk$")
PUNCH_DELAY = 0.2  # seconds a freed block waits (reusable as it is) before its space is given back
PUNCH_BATCH = 256 << 20  # bytes handed to the punch thread at once (not reusable meanwhile; ~60 ms with discard)
PUNCH_CALL_MAX = 64 << 20  # bytes per fallocate call: `close` waits for at most one call (~15 ms with discard)
_log = logging.getLogger(__name__)


def size_shift(n: int) -> int:
    """log2 of the block size that holds `n` bytes (a power of two, at least 4 KiB)."""
    return max(MIN_SHIFT, (n - 1).bit_length())


def split(loc: int) -> tuple[int, int]:
    """(block-size shift, block index) of a location."""
    return loc >> _INDEX_BITS, loc & ((1 << _INDEX_BITS) - 1)


def direct_view(data, align: int = ALIGN):
    """`data` extended to a multiple of `align` bytes, if it starts `align`-aligned inside a writable buffer that
    long (the RPC layer receives payloads into such buffers); else None."""
    if not isinstance(data, memoryview) or data.obj is None or data.readonly:
        return None
    try:
        full = memoryview(data.obj).cast("B")
        m = -(-len(data) // align) * align
        if len(full) < m or not len(data):
            return None
        addr = ctypes.addressof(ctypes.c_char.from_buffer(data))
        if addr % align or addr != ctypes.addressof(ctypes.c_char.from_buffer(full)):
            return None
    except (TypeError, ValueError):
        return None
    return full[:m]


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _load_fallocate():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(lib, "fallocate64", None) or getattr(lib, "fallocate", None)  # 64-bit offsets on every ABI
    if fn is None:  # not Linux/glibc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _load_fallocate()
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS}
_punch_pool: ThreadPoolExecutor | None = None
_told_unsupported = False


def _punch_executor() -> ThreadPoolExecutor:
    """One thread for every target of the process: punches are background work and queue behind each other
    rather than compete with the foreground I/O threads for the disk."""
    global _punch_pool
    if _punch_pool is None:
        _punch_pool = ThreadPoolExecutor(1, thread_name_prefix="blocks-punch")
    return _punch_pool


def _data_ranges(fd: int, size: int):
    """(start, end) byte ranges of `fd` holding data (SEEK_DATA/SEEK_HOLE); the whole file where unsupported."""
    if not hasattr(os, "SEEK_DATA"):
        yield 0, size
        return
    off = 0
    while off < size:
        try:
            d = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past `off`
                return
            yield off, size  # EINVAL: the file system cannot tell
            return
        h = os.lseek(fd, d, os.SEEK_HOLE)
        yield d, h
        off = h


class BlockFiles:
    def __init__(self, root: str):
        self.dir = os.path.join(root, "blocks")
        os.makedirs(self.dir, exist_ok=True)
        self.direct = hasattr(os, "O_DIRECT")
        self._fds: dict[int, int] = {}  # shift -> fd (page cache)
        self._dfds: dict[int, int | None] = {}  # shift -> O_DIRECT fd, None where the file system refuses it
        self._end: dict[int, int] = {}  # shift -> first index never handed out
        self._refs: dict[int, int] = {}  # loc -> readers holding it
        self._doomed: set[int] = set()  # freed while held: freed on the last release
        # Free blocks (see the module docstring), event-loop thread only:
        self._dirty: dict[int, deque[tuple[int, float]]] = {}  # shift -> (index, freed at), oldest on the left
        self._clean: dict[int, set[int]] = {}  # shift -> punched indexes
        self._heap: dict[int, list[int]] = {}  # shift -> min-heap over `_clean` (stale entries skipped)
        self._punching: dict[int, int] = {}  # shift -> blocks with the punch thread
        self.punch_delay = PUNCH_DELAY
        self.can_punch = _FALLOCATE is not None  # False once the file system refuses (EOPNOTSUPP)
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a batch is with the punch thread
        self._closed = False
        self._io_lock = threading.Lock()  # one punch call vs close(): never punch through a closed (reused) fd

    def reset(self, used) -> None:
        """Start-up: every block of the existing files that `used` does not name is free (a crash between a
        block write and its metadata commit leaves such blocks)."""
        taken: dict[int, set[int]] = {}
        for loc in used:
            if loc != NONE:
                s, i = split(loc)
                taken.setdefault(s, set()).add(i)
        shifts = set(taken)
        for name in os.listdir(self.dir):
            m = _NAME.match(name)
            if m:
                shifts.add(int(m.group(1)))
        for s in shifts:
            path = self._path(s)
            size = os.path.getsize(path) if os.path.exists(path) else 0
            end = max(-(-size >> s), max(taken.get(s, ()), default=-1) + 1)
            self._open(s)
            self._end[s] = end
            free = set(range(end)) - taken.get(s, set())
            # Free blocks that still hold data (orphans of a crash, or freed before a kill -9 let their punch
            # run) are dirty, to be punched; the rest are holes already.
            stale: set[int] = set()
            for lo, hi in _data_ranges(self._fds[s], size):
                stale.update(i for i in range(lo >> s, -(-hi >> s)) if i in free)
            self._dirty[s] = deque((i, 0.0) for i in sorted(stale, reverse=True))  # lowest index reused first
            self._clean[s] = free - stale
            self._heap[s] = sorted(self._clean[s])
            self._punching[s] = 0
            self._trim(s)
        self._schedule()

    def _path(self, shift: int) -> str:
        return os.path.join(self.dir, f"k{shift}.blk")

    def _open(self, shift: int) -> None:
        if shift in self._fds:
            return
        path = self._path(shift)
        self._fds[shift] = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        dfd = None
        if self.direct:
            try:
                dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError:  # e.g. tmpfs
                pass
        self._dfds[shift] = dfd
        self._end.setdefault(shift, 0)
        self._dirty.setdefault(shift, deque())
        self._clean.setdefault(shift, set())
        self._heap.setdefault(shift, [])
        self._punching.setdefault(shift, 0)

    # ------------------------------------------------------------ allocation (event-loop thread only)
    def allocate(self, n: int) -> int:
        """A free block for `n` bytes (NONE for no bytes)."""
        if n <= 0:
            return NONE
        s = size_shift(n)
        self._open(s)
        dirty = self._dirty[s]
        if dirty:  # the newest freed block: its bytes are still allocated, so no punch and no hole to fill
            return (s << _INDEX_BITS) | dirty.pop()[0]
        clean, heap = self._clean[s], self._heap[s]
        while clean:
            i = heapq.heappop(heap)
            if i in clean:
                clean.discard(i)
                return (s << _INDEX_BITS) | i
        i = self._end[s]
        self._end[s] = i + 1
        return (s << _INDEX_BITS) | i

    def free(self, loc: int) -> None:
        """Make `loc` reusable; call it only once no committed metadata names the block (see the module
        docstring), since its space is given back `punch_delay` seconds later unless reused first."""
        if loc == NONE:
            return
        if self._refs.get(loc):
            self._doomed.add(loc)
            return
        s, i = split(loc)
        self._dirty[s].append((i, time.monotonic()))
        if self._timer is None:
            self._schedule()

    def hold(self, loc: int) -> None:
        if loc != NONE:
            self._refs[loc] = self._refs.get(loc, 0) + 1

    def release(self, loc: int) -> None:
        if loc == NONE:
            return
        n = self._refs.get(loc, 0) - 1
        if n > 0:
            self._refs[loc] = n
            return
        self._refs.pop(loc, None)
        if loc in self._doomed:
            self._doomed.discard(loc)
            self.free(loc)

    def used_count(self) -> int:
        """Blocks handed out and not free again (held blocks freed meanwhile included)."""
        free = sum(len(d) for d in self._dirty.values()) + sum(len(c) for c in self._clean.values())
        return sum(self._end.values()) - free - sum(self._punching.values())

    # ------------------------------------------------------------ giving space back (event-loop thread only)
    def reclaim(self, min_age: float = 0.0) -> int:
        """Punch every block free for at least `min_age` seconds now, on this thread, and return the bytes
        punched. Under a running event loop this happens by itself (`punch_delay` after a free, on a thread);
        this is for use without one.

        >>> import tempfile
        >>> bf = BlockFiles(tempfile.mkdtemp())
        >>> bf.free(bf.allocate(1 << 20))
        >>> bf.reclaim(), bf.reclaim()
        (1048576, 0)
        """
        done = 0
        while True:
            batch = self._take(time.monotonic() - min_age)
            if not batch:
                return done
            try:
                done += self._punch(batch)
            finally:
                self._finish(batch)

    def _schedule(self) -> None:
        """Arm the timer for the oldest dirty block, if an event loop runs on this thread."""
        if self._timer is not None or self._busy or self._closed:
            return
        oldest = min((d[0][1] for d in self._dirty.values() if d), default=None)
        if oldest is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: `reclaim` is called explicitly
            return
        wait = max(0.0, oldest + self.punch_delay - time.monotonic())
        self._timer = loop.call_later(wait, self._pass, loop)

    def _pass(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._closed:
            return
        batch = self._take(time.monotonic() - self.punch_delay, PUNCH_BATCH)
        if not batch:
            self._schedule()
            return
        if not self.can_punch:  # nothing to do but make them reusable
            self._finish(batch)
            self._schedule()
            return
        self._busy = True
        fut = loop.run_in_executor(_punch_executor(), self._punch, batch)
        fut.add_done_callback(lambda f: self._punched(batch, f))

    def _punched(self, batch: dict[int, list[int]], fut) -> None:
        self._busy = False
        if self._closed:
            return
        if not fut.cancelled() and fut.exception() is not None:
            _log.warning("punching free blocks in %s failed: %r", self.dir, fut.exception())
        self._finish(batch)
        self._schedule()

    def _take(self, freed_before: float, limit: float = float("inf")) -> dict[int, list[int]]:
        """Move dirty blocks freed before `freed_before` (oldest first, up to `limit` bytes) to punching."""
        batch: dict[int, list[int]] = {}
        room = limit
        for s, dirty in self._dirty.items():
            picked = []
            while dirty and dirty[0][1] <= freed_before and room > 0:
                picked.append(dirty.popleft()[0])
                room -= 1 << s
            if picked:
                batch[s] = picked
                self._punching[s] += len(picked)
        return batch

    def _finish(self, batch: dict[int, list[int]]) -> None:
        """The batch is punched (or could not be): its blocks are clean, reusable again."""
        for s, idx in batch.items():
            self._punching[s] -= len(idx)
            clean, heap = self._clean[s], self._heap[s]
            clean.update(idx)
            if len(heap) > 2 * len(clean) + 64:  # too many stale entries (reused or trimmed): rebuild
                heap[:] = sorted(clean)
            else:
                for i in idx:
                    heapq.heappush(heap, i)
            self._trim(s)

    def _trim(self, s: int) -> None:
        """Truncate the block file below its clean (punched) tail: a size change only, cheap on this thread."""
        if not self.can_punch:
            return  # the tail may still hold data: freeing it could take long on this thread
        end = self._end[s]
        clean, e = self._clean[s], end
        while e and (e - 1) in clean:
            e -= 1
            clean.discard(e)
        if e != end:
            os.ftruncate(self._fds[s], e << s)
            self._end[s] = e

    def _punch(self, batch: dict[int, list[int]]) -> int:
        """Any thread: punch the batch's blocks, adjacent ones in one call; returns the bytes punched."""
        done = 0
        for s, idx in batch.items():
            for off, n in _ranges(sorted(idx), s):
                with self._io_lock:
                    if self._closed or not self.can_punch:
                        return done
                    if _FALLOCATE(self._fds[s], _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, n) != 0:
                        err = ctypes.get_errno()
                        if err in _UNSUPPORTED:
                            self.can_punch = False
                            _tell_unsupported(self.dir, err)
                            return done
                        raise OSError(err, f"fallocate(PUNCH_HOLE) on {self._path(s)}: {os.strerror(err)}")
                done += n
        return done

    # ------------------------------------------------------------ data (any thread)
    def span(self, loc: int) -> tuple[int, int]:
        """(fd, file offset) of a block, for pread/sendfile; the fd stays owned by this object."""
        s, i = split(loc)
        return self._fds[s], i << s

    def write(self, loc: int, data) -> None:
        """Write `data` at the start of block `loc` (thread-safe: one pwrite, no shared state changes)."""
        n = len(data)
        if loc == NONE or n == 0:
            return
        s, i = split(loc)
        if n > 1 << s:
            raise ValueError(f"data: {n} bytes do not fit a {1 << s}-byte block")
        off = i << s
        dfd = self._dfds.get(s)
        if dfd is not None and self.direct:
            padded = direct_view(data)
            if padded is not None:
                try:
                    _pwrite_all(dfd, padded, off)
                    return
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # the device wants another alignment: page cache from now on
        fd = self._fds[s]
        _pwrite_all(fd, data, off)
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, off, n, _SYNC_FILE_RANGE_WRITE)  # start writeback now, do not wait for it

    def read(self, loc: int, offset: int = 0, length: int = 0) -> bytes:
        if loc == NONE or length <= 0:
            return b""
        fd, off = self.span(loc)
        out = os.pread(fd, length, off + offset)
        while len(out) < length:  # a short read (a signal): finish it
            more = os.pread(fd, length - len(out), off + offset + len(out))
            if not more:
                break
            out += more
        return out

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._io_lock:  # waits for the punch call under way, if any; later ones see `_closed`
            self._closed = True
            for fd in list(self._fds.values()) + [d for d in self._dfds.values() if d is not None]:
                os.close(fd)
            self._fds.clear()
            self._dfds.clear()


def _tell_unsupported(where: str, err: int) -> None:
    """Debug-log, once per process (not once per target), that freed space stays allocated."""
    global _told_unsupported
    if not _told_unsupported:
        _told_unsupported = True
        _log.debug("%s: file system cannot punch holes (%s); freed space stays allocated", where, os.strerror(err))


def _ranges(indexes: list[int], shift: int):
    """(offset, length) byte ranges of sorted block `indexes`, adjacent blocks merged, at most PUNCH_CALL_MAX."""
    per = max(1, PUNCH_CALL_MAX >> shift)
    start = prev = indexes[0]
    for i in indexes[1:] + [None]:
        if i is not None and i == prev + 1 and i - start < per:
            prev = i
            continue
        yield start << shift, (prev - start + 1) << shift
        if i is not None:
            start = prev = i


def _pwrite_all(fd: int, data, off: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], off + done)
