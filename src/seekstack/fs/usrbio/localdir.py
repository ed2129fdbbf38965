"""`LocalDirClient`: the `seekstack.fs` client API over a local directory.

The access layers (KVCache, fsspec, USRBIO, FUSE) are written against the client's method set (`open` returning a
file with `pread`/`pwrite`, `stat`, `scandir`, `mkdir`, `rename`, ...). This class implements the same set on a
plain directory, like fsspec's local filesystem: a real backend for single-machine use and an independent oracle in
tests. Paths are absolute inside the directory; `..` cannot climb out of it.

>>> import tempfile
>>> fs = LocalDirClient(tempfile.mkdtemp())
>>> fs.write_bytes("/a.bin", b"hello")
5
>>> fs.open("/a.bin").pread(3, 1)
b'ell'
"""

from __future__ import annotations

import os
import posixpath
import stat as _stat

from seekstack.fs.positional import PositionalFile

_TYPES = {_stat.S_IFREG: "file", _stat.S_IFDIR: "dir", _stat.S_IFLNK: "symlink"}


def _parse_mode(mode: str) -> tuple[int, bool, bool, bool]:
    """(os flags, readable, writable, append) for a binary open() mode string."""
    if not isinstance(mode, str) or not mode or set(mode) - set("rwaxb+") or mode[0] not in "rwax":
        raise ValueError(f"mode: unsupported open mode {mode!r} (binary modes r, w, a, x with optional +)")
    kind, plus = mode[0], "+" in mode
    read, write = kind == "r" or plus, kind != "r" or plus
    flags = os.O_RDWR if read and write else (os.O_RDONLY if read else os.O_WRONLY)
    flags |= {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT, "x": os.O_CREAT | os.O_EXCL}[kind]
    return flags, read, write, kind == "a"


class LocalFile(PositionalFile):
    """An open file of a `LocalDirClient`; same methods as `seekstack.fs.File` plus a zero-copy `preadinto`."""

    def __init__(self, path: str, real: str, mode: str, perm: int):
        super().__init__()
        flags, self._readable, self._writable, self._append = _parse_mode(mode)
        self.name = path
        self.fd = os.open(real, flags | getattr(os, "O_CLOEXEC", 0), perm)
        self.pos = os.fstat(self.fd).st_size if self._append else 0

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def readable(self):
        return self._readable

    def writable(self):
        return self._writable

    def seekable(self):
        return True

    def fileno(self) -> int:
        return self.fd

    def pread(self, size: int, offset: int) -> bytes:
        if size < 0 or offset < 0:
            raise ValueError(f"size and offset must be >= 0, got size={size}, offset={offset}")
        return os.pread(self.fd, size, offset)

    def preadinto(self, buf, offset: int) -> int:
        """Read into `buf` (any writable buffer) at `offset`; the kernel copies straight into it."""
        mv = memoryview(buf).cast("B")
        done = 0
        while done < len(mv):  # preadv may return short counts before EOF
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pwrite(self, data, offset: int) -> int:
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], offset + done)
        return done

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        os.ftruncate(self.fd, size)
        return size

    def fsync(self) -> None:
        os.fsync(self.fd)

    def flush(self):
        pass

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


class LocalDirClient:
    """The `seekstack.fs` client API over the local directory `root` (see the module docstring)."""

    def __init__(self, root):
        self.root = os.path.realpath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise ValueError(f"root: {root!r} is not a directory")

    def _real(self, path) -> str:
        path = os.fspath(path)
        if not isinstance(path, str):
            raise TypeError(f"path must be str or PathLike, got {type(path).__name__}")
        if "\0" in path:
            raise ValueError("path: embedded null byte")
        if path.startswith("3fs:"):
            path = path[4:]
        norm = posixpath.normpath("/" + path.lstrip("/"))  # normpath on an absolute path drops leading '..'
        return self.root if norm == "/" else self.root + norm

    # files
    def open(self, path, mode: str = "rb", *, perm: int = 0o644, **_layout) -> LocalFile:
        return LocalFile(os.fspath(path), self._real(path), mode, perm)

    def read_bytes(self, path) -> bytes:
        with self.open(path) as f:
            return f.read()

    def write_bytes(self, path, data, **kw) -> int:
        with self.open(path, "wb", **kw) as f:
            return f.write(data)

    # namespace
    def stat(self, path, follow_symlinks: bool = True) -> os.stat_result:
        return os.stat(self._real(path), follow_symlinks=follow_symlinks)

    def lstat(self, path) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path) -> bool:
        return os.path.exists(self._real(path))

    def isdir(self, path) -> bool:
        return os.path.isdir(self._real(path))

    def scandir(self, path="/") -> list[dict]:
        out = []
        with os.scandir(self._real(path)) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                out.append({"name": e.name, "ino": e.inode(), "type": _TYPES.get(_stat.S_IFMT(st.st_mode), "file")})
        return sorted(out, key=lambda d: d["name"])

    def listdir(self, path="/") -> list[str]:
        return [e["name"] for e in self.scandir(path)]

    def mkdir(self, path, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        if parents:
            os.makedirs(self._real(path), mode, exist_ok=exist_ok)
        else:
            try:
                os.mkdir(self._real(path), mode)
            except FileExistsError:
                if not (exist_ok and self.isdir(path)):
                    raise

    def makedirs(self, path, mode: int = 0o755, exist_ok: bool = False) -> None:
        self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    def rmdir(self, path) -> None:
        os.rmdir(self._real(path))

    def unlink(self, path) -> None:
        os.unlink(self._real(path))

    def remove(self, path, recursive: bool = False) -> None:
        st = self.lstat(path)
        if not _stat.S_ISDIR(st.st_mode):
            return self.unlink(path)
        if recursive:
            for name in self.listdir(path):
                self.remove(posixpath.join(os.fspath(path), name), recursive=True)
        self.rmdir(path)

    def rename(self, src, dst) -> None:
        os.rename(self._real(src), self._real(dst))

    replace = rename

    def truncate(self, path, length: int) -> None:
        os.truncate(self._real(path), length)

    def symlink(self, target: str, path) -> None:
        os.symlink(target, self._real(path))

    def readlink(self, path) -> str:
        return os.readlink(self._real(path))

    def link(self, src, dst) -> None:
        os.link(self._real(src), self._real(dst))

    def chmod(self, path, mode: int) -> None:
        os.chmod(self._real(path), mode)

    def chown(self, path, uid: int | None = None, gid: int | None = None) -> None:
        os.chown(self._real(path), -1 if uid is None else uid, -1 if gid is None else gid)

    def utime(self, path, times: tuple[float, float]) -> None:
        os.utime(self._real(path), times)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
