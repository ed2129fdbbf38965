"""`KVCacheStore`: content-addressed KV-cache blocks on the file system, for an inference system's on-disk context
cache (the 3FS KVCache use case).

A block is stored under a key derived from the token prefix it encodes (`block_keys` chains SHA-256 over fixed-size
token blocks, so a shared prefix yields shared keys). Each block is one file `ROOT/<k[:2]>/<key>` holding a 64-byte
header (magic, payload length, key digest, BLAKE2b checksum of key + payload) and the payload. Reads verify the
checksum: a corrupt, truncated or unreadable block is a miss and is dropped, never returned. `get_many` reads all
blocks of a batch through one USRBIO-style ring, every read in flight at once into one shared-memory buffer. Total
size is capped; the least recently used blocks are removed first (GC = file removes, as in 3FS).

The recency index lives in this process (rebuilt from file mtimes at start-up); several processes may share a root,
and a block another process evicted simply reads as a miss.

>>> import tempfile
>>> from seekstack.fs.usrbio import LocalDirClient
>>> store = KVCacheStore(LocalDirClient(tempfile.mkdtemp()), capacity_bytes=1 << 20)
>>> keys = block_keys(list(range(40)), block_tokens=16)   # two full blocks
>>> store.put(keys[0], b"kv of tokens 0..15")
True
>>> store.get_many(keys)
[b'kv of tokens 0..15', None]
"""

from __future__ import annotations

import errno
import hashlib
import re
import struct
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from seekstack.fs.usrbio import Ior, Iov, dereg_fd, prep_io, reg_fd, submit_ios, wait_for_ios

MAGIC = b"SKV1"
_HDR = struct.Struct("<4sQ32s16s4x")  # magic, payload length, key digest, checksum; 64 bytes
HEADER_SIZE = _HDR.size
_KEY_RE = re.compile(r"^[0-9a-f]{16,128}$")


def prefix_key(tokens: Sequence[int], parent: str | None = None) -> str:
    """SHA-256 (hex) of `tokens` as little-endian int64, chained onto `parent` (the key of the preceding block)."""
    h = hashlib.sha256()
    if parent is not None:
        h.update(bytes.fromhex(_check_key(parent, "parent")))
    try:
        h.update(struct.pack(f"<{len(tokens)}q", *(int(t) for t in tokens)))
    except (struct.error, TypeError, ValueError) as e:
        raise ValueError(f"tokens: must be ints in the int64 range ({e})") from None
    return h.hexdigest()


def block_keys(tokens: Sequence[int], block_tokens: int) -> list[str]:
    """One key per full block of `block_tokens` tokens; key i identifies the whole prefix tokens[: (i+1)*block]."""
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    keys: list[str] = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        keys.append(prefix_key(tokens[start : start + block_tokens], keys[-1] if keys else None))
    return keys


def _check_key(key, name: str = "key") -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) % 2:
        raise ValueError(f"{name}: expected an even-length lowercase hex string of 16-128 chars, got {key!r}")
    return key


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


def _checksum(key_digest: bytes, payload) -> bytes:
    h = hashlib.blake2b(key_digest, digest_size=16)
    h.update(payload)
    return h.digest()


class KVCacheStore:
    """KV-cache blocks under directory `root` of `client` (a `seekstack.fs` client, or anything with its API,
    e.g. `LocalDirClient`), at most `capacity_bytes` in total (headers included).

    >>> # store = KVCacheStore(seekstack.fs.connect("/tmp/3fs"), "/kvcache", capacity_bytes=8 << 30)
    >>> # store.put(key, kv_block.numpy()); blocks = store.get_many(keys)
    """

    def __init__(self, client, root: str = "/kvcache", capacity_bytes: int = 1 << 30, *, ring_entries: int = 256):
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        if not isinstance(root, str) or not root.startswith("/"):
            raise ValueError(f"root: expected an absolute path, got {root!r}")
        self.client, self.root, self.capacity = client, root.rstrip("/") or "/", capacity_bytes
        self.ring_entries = ring_entries
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, least recently used first
        self._used = 0
        self._lock = threading.RLock()
        self._dirs: set[str] = set()
        self._local = threading.local()  # one ring + iov per thread, as USRBIO recommends
        self._rings: list = []  # every thread's ring, for close()
        self._opener = ThreadPoolExecutor(8, thread_name_prefix="kvcache-open")
        self.stats = {"hits": 0, "misses": 0, "corrupt": 0, "evictions": 0, "puts": 0}
        self.client.mkdir(self.root, parents=True, exist_ok=True)
        self._load_index()

    # -------------------------------------------------------------- paths and index
    def _dir(self, key: str) -> str:
        return f"{self.root}/{key[:2]}"

    def _path(self, key: str) -> str:
        return f"{self._dir(key)}/{key}"

    def _load_index(self) -> None:
        found = []
        for sub in self.client.scandir(self.root):
            if sub["type"] != "dir":
                continue
            d = f"{self.root}/{sub['name']}"
            self._dirs.add(d)
            for e in self.client.scandir(d):
                name = e["name"]
                try:
                    if name.startswith("."):  # a put that died before its rename
                        self.client.unlink(f"{d}/{name}")
                        continue
                    if _KEY_RE.match(name):
                        st = self.client.stat(f"{d}/{name}")
                        found.append((st.st_mtime, name, st.st_size))
                except FileNotFoundError:
                    pass  # removed by another process meanwhile
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key) -> bool:
        return self.exists(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size

    # -------------------------------------------------------------- API
    def put(self, key: str, data) -> bool:
        """Store `data` (any bytes-like object, e.g. a numpy array) as block `key`; returns False when the block
        alone exceeds the capacity. Replaces an existing block atomically (write to a temp file, then rename)."""
        _check_key(key)
        payload = memoryview(data).cast("B")
        size = HEADER_SIZE + len(payload)
        if size > self.capacity:
            return False
        kd = _digest(key)
        header = _HDR.pack(MAGIC, len(payload), kd, _checksum(kd, payload))
        d = self._dir(key)
        if d not in self._dirs:
            self.client.mkdir(d, exist_ok=True)
            self._dirs.add(d)
        tmp = f"{d}/.{key}.{uuid.uuid4().hex[:8]}"
        with self.client.open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        self.client.rename(tmp, self._path(key))
        with self._lock:
            self._forget(key)
            self._index[key] = size
            self._used += size
            self.stats["puts"] += 1
        self.gc(keep=key)
        return True

    def exists(self, key: str) -> bool:
        """True when block `key` is stored (checks the file system, not only this process's index)."""
        _check_key(key)
        try:
            self.client.stat(self._path(key))
            return True
        except FileNotFoundError:
            self._forget(key)
            return False

    def remove(self, key: str) -> bool:
        """Delete block `key`; returns whether it existed."""
        _check_key(key)
        self._forget(key)
        try:
            self.client.unlink(self._path(key))
            return True
        except FileNotFoundError:
            return False

    def get(self, key: str) -> bytes | None:
        """Block `key`'s bytes, or None on a miss (absent, lost, or failing its checksum)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Blocks for `keys` (None for misses), read in one batch: all reads in flight together, landing in one
        shared-memory buffer."""
        keys = [_check_key(k) for k in keys]
        out: list[bytes | None] = [None] * len(keys)
        for start in range(0, len(keys), self.ring_entries):
            part = keys[start : start + self.ring_entries]
            out[start : start + len(part)] = self._get_batch(part)
        with self._lock:
            hits = sum(v is not None for v in out)
            self.stats["hits"] += hits
            self.stats["misses"] += len(out) - hits
        return out

    def gc(self, target_bytes: int | None = None, keep: str | None = None) -> int:
        """Remove least recently used blocks until at most `target_bytes` (default: the capacity) are used; returns
        how many were removed. `keep` is never removed."""
        target = self.capacity if target_bytes is None else target_bytes
        removed = 0
        while True:
            with self._lock:
                if self._used <= target:
                    return removed
                victim = next((k for k in self._index if k != keep), None)
                if victim is None:
                    return removed
                self._forget(victim)
                self.stats["evictions"] += 1
            try:
                self.client.unlink(self._path(victim))
            except FileNotFoundError:
                pass
            removed += 1

    def close(self) -> None:
        """Release every thread's ring and buffer (the blocks stay on the file system)."""
        self._opener.shutdown()
        with self._lock:
            rings, self._rings = self._rings, []
        for loc in rings:
            loc.ior.destroy()
            if loc.iov is not None:
                loc.iov.close()
            loc.ior = loc.iov = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- batched read
    def _ring(self, need: int) -> tuple[Ior, Iov]:
        loc = self._local
        if getattr(loc, "ior", None) is None:
            loc.ior = Ior(self.ring_entries, for_read=True, io_depth=0)
            loc.iov = None
            with self._lock:
                self._rings.append(loc)
        if loc.iov is None or loc.iov.size < need:
            if loc.iov is not None:
                loc.iov.close()
            loc.iov = Iov(max(need, 1 << 20, 2 * (loc.iov.size if loc.iov else 0)))
        return loc.ior, loc.iov

    def _open(self, key: str):
        try:
            return self.client.open(self._path(key), "rb")
        except FileNotFoundError:
            self._forget(key)
        except OSError:  # meta unreachable etc.: a miss, not an error
            pass
        return None

    def _drop_corrupt(self, key: str) -> None:
        with self._lock:
            self.stats["corrupt"] += 1
        self._forget(key)
        try:
            self.client.unlink(self._path(key))
        except OSError:
            pass

    def _get_batch(self, keys: list[str]) -> list[bytes | None]:
        files = list(self._opener.map(self._open, keys))
        sizes = [f.size if f is not None else 0 for f in files]
        ior, iov = self._ring(sum(sizes))
        fds, ptrs, ptr, n = [], [], 0, 0
        for f, size in zip(files, sizes):
            fds.append(reg_fd(f) if f is not None and size >= HEADER_SIZE else None)
            ptrs.append(ptr)
            if fds[-1] is not None:
                prep_io(ior, iov, True, ptr, fds[-1], 0, size, userdata=len(fds) - 1)
                ptr += size
                n += 1
        results: dict[int, int] = {}
        try:
            submit_ios(ior)
            while len(results) < n:
                for c in wait_for_ios(ior, n - len(results), min_results=1):
                    results[c.userdata] = c.result
        finally:
            for fd in fds:
                if fd is not None:
                    dereg_fd(fd)
            for f in files:
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        out: list[bytes | None] = []
        for i, key in enumerate(keys):
            default = -errno.ENOENT if files[i] is None else 0  # too short to hold a header: corrupt
            out.append(self._verify(key, iov, ptrs[i], sizes[i], results.get(i, default)))
        return out

    def _verify(self, key: str, iov: Iov, ptr: int, size: int, result: int) -> bytes | None:
        if result < 0:
            if result == -errno.ENOENT:
                self._forget(key)
            return None  # lost or unreadable: a miss
        buf = iov.view(ptr, size)
        try:
            if result < HEADER_SIZE:
                return self._drop_corrupt(key)
            magic, length, kd, checksum = _HDR.unpack(buf[:HEADER_SIZE])
            if magic != MAGIC or length != result - HEADER_SIZE or kd != _digest(key):
                return self._drop_corrupt(key)
            payload = buf[HEADER_SIZE:result]
            if _checksum(kd, payload) != checksum:
                return self._drop_corrupt(key)
            with self._lock:
                if key in self._index:
                    self._index.move_to_end(key)
                else:  # written by another process
                    self._index[key] = size
                    self._used += size
            return bytes(payload)
        finally:
            buf.release()
