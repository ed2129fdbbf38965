"""pyfuse3 operations over a `seekstack.fs` client (or anything with its API, e.g. `LocalDirClient`).

The kernel speaks inodes, the client speaks paths, so we keep one path per inode number (the client's own inode
numbers, the root mapped to FUSE's root inode) and rewrite it on rename. Every client call is blocking, so it runs
on a worker thread: FUSE requests proceed in parallel instead of queueing behind one network round trip. Client
`OSError`s become `FUSEError(errno)`, which the kernel hands to the application unchanged.

Attribute and entry timeouts are 0: another client may change the cluster at any time, so the kernel asks again.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import stat as _stat
import threading

import pyfuse3
import trio

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _fuse_errors(fn):
    """Run the (blocking) body on a worker thread and turn OSError into FUSEError."""

    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await trio.to_thread.run_sync(functools.partial(fn, self, *args), limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except ValueError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None

    return wrapper


def _name(raw: bytes) -> str:
    name = os.fsdecode(raw)
    if "/" in name or name in ("", ".", ".."):
        raise pyfuse3.FUSEError(errno.EINVAL)
    return name


class FsOperations(pyfuse3.Operations):
    """Serve `client`'s namespace; see the module docstring."""

    supports_dot_lookup = False

    def __init__(self, client, threads: int = 16):
        super().__init__()
        self.client = client
        self.limiter = trio.CapacityLimiter(threads)
        self._lock = threading.Lock()
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: "/"}
        self._root_ino = client.stat("/").st_ino
        self._files: dict[int, tuple[object, int, bool]] = {}  # fh -> (client file, inode, append)
        self._next_fh = 1

    # -------------------------------------------------------------- inode <-> path
    def _ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self._root_ino else st_ino

    def _path(self, inode: int) -> str:
        with self._lock:
            p = self._paths.get(inode)
        if p is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return p

    def _child(self, parent: int, raw: bytes) -> str:
        return posixpath.join(self._path(parent), _name(raw))

    def _attrs(self, path: str, st) -> pyfuse3.EntryAttributes:
        ino = self._ino(st.st_ino)
        with self._lock:
            self._paths[ino] = path
            open_sizes = [f.size for f, i, _ in self._files.values() if i == ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = 0
        # A file open for writing knows its length before meta does (meta settles it at close/fsync).
        a.st_size = max([st.st_size, *open_sizes]) if _stat.S_ISREG(st.st_mode) else st.st_size
        a.st_blksize = 1 << 16
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = int(st.st_atime * 1e9)
        a.st_mtime_ns = int(st.st_mtime * 1e9)
        a.st_ctime_ns = int(st.st_ctime * 1e9)
        return a

    def _stat_attrs(self, path: str) -> pyfuse3.EntryAttributes:
        return self._attrs(path, self.client.lstat(path))

    def _moved(self, old: str, new: str) -> None:
        with self._lock:
            for ino, p in list(self._paths.items()):
                if p == old or p.startswith(old + "/"):
                    self._paths[ino] = new + p[len(old) :]

    # -------------------------------------------------------------- lookups and attributes
    @_fuse_errors
    def lookup(self, parent_inode, name, ctx=None):
        return self._stat_attrs(self._child(parent_inode, name))

    @_fuse_errors
    def getattr(self, inode, ctx=None):
        return self._stat_attrs(self._path(inode))

    @_fuse_errors
    def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        if fields.update_size:
            f = self._files.get(fh, (None,))[0] if fh is not None else None
            if f is not None and f.writable():
                f.truncate(attr.st_size)
            else:
                self.client.truncate(path, attr.st_size)
            with self._lock:  # other handles of this inode must not report their old length
                for g, i, _ in self._files.values():
                    if i == inode and g is not f:
                        g.size = attr.st_size
        if fields.update_mode:
            self.client.chmod(path, _stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            self.client.chown(
                path, attr.st_uid if fields.update_uid else None, attr.st_gid if fields.update_gid else None
            )
        if fields.update_atime or fields.update_mtime:
            st = self.client.stat(path)
            atime = attr.st_atime_ns / 1e9 if fields.update_atime else st.st_atime
            mtime = attr.st_mtime_ns / 1e9 if fields.update_mtime else st.st_mtime
            self.client.utime(path, (atime, mtime))
        return self._stat_attrs(path)

    @_fuse_errors
    def readlink(self, inode, ctx):
        return os.fsencode(self.client.readlink(self._path(inode)))

    async def access(self, inode, mode, ctx):
        return True  # mounted with default_permissions: the kernel checks the mode bits itself

    async def forget(self, inode_list):
        pass  # paths stay cached; an inode number is never reused for another file by the cluster

    @_fuse_errors
    def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 1 << 16
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30  # capacity is the cluster's, not known to the client
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # -------------------------------------------------------------- directories
    async def opendir(self, inode, ctx):
        self._path(inode)
        return inode

    @_fuse_errors
    def _list(self, inode):
        path = self._path(inode)
        out = []
        for e in self.client.scandir(path):
            p = posixpath.join(path, e["name"])
            try:
                out.append((e["name"], self._stat_attrs(p)))
            except FileNotFoundError:
                continue  # removed since the scan
        return out

    async def readdir(self, fh, start_id, token):
        entries = await self._list(fh)
        for i in range(start_id, len(entries)):
            name, attrs = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, i + 1):
                break

    async def releasedir(self, fh):
        pass

    @_fuse_errors
    def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        self.client.mkdir(path, _stat.S_IMODE(mode))
        return self._stat_attrs(path)

    @_fuse_errors
    def rmdir(self, parent_inode, name, ctx):
        self.client.rmdir(self._child(parent_inode, name))

    @_fuse_errors
    def unlink(self, parent_inode, name, ctx):
        self.client.unlink(self._child(parent_inode, name))

    @_fuse_errors
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if flags & RENAME_NOREPLACE and self.client.exists(new):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.client.rename(old, new)
        self._moved(old, new)

    @_fuse_errors
    def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        self.client.symlink(os.fsdecode(target), path)
        return self._stat_attrs(path)

    @_fuse_errors
    def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        self.client.link(self._path(inode), path)
        return self._stat_attrs(path)

    # -------------------------------------------------------------- files
    def _add_file(self, f, inode: int, append: bool) -> int:
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._files[fh] = (f, inode, append)
        return fh

    def _file(self, fh: int):
        entry = self._files.get(fh)
        if entry is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return entry

    @staticmethod
    def _mode(flags: int) -> str:
        acc = flags & os.O_ACCMODE
        return "rb" if acc == os.O_RDONLY else "r+b"

    @_fuse_errors
    def open(self, inode, flags, ctx):
        path = self._path(inode)
        f = self.client.open(path, self._mode(flags))
        if flags & os.O_TRUNC and f.writable():
            f.truncate(0)
        return pyfuse3.FileInfo(fh=self._add_file(f, inode, bool(flags & os.O_APPEND)))

    @_fuse_errors
    def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        f = self.client.open(path, "x+b" if flags & os.O_EXCL else "w+b", perm=_stat.S_IMODE(mode))
        attrs = self._stat_attrs(path)
        return pyfuse3.FileInfo(fh=self._add_file(f, attrs.st_ino, bool(flags & os.O_APPEND))), attrs

    @_fuse_errors
    def read(self, fh, off, size):
        return self._file(fh)[0].pread(size, off)

    @_fuse_errors
    def write(self, fh, off, buf):
        f, _, append = self._file(fh)
        if append:  # the kernel's idea of the end may be stale; the file's is not
            off = f.size
        return f.pwrite(buf, off)

    @_fuse_errors
    def fsync(self, fh, datasync):
        f = self._file(fh)[0]
        if f.writable():
            f.fsync()

    @_fuse_errors
    def flush(self, fh):
        # close(2) waits for FLUSH but not for RELEASE, so the length is settled on meta here: the next open or
        # stat (from any client) sees every byte written through this handle (close-to-open consistency).
        # The data itself is already committed on all replicas when each write returns.
        f = self._file(fh)[0]
        if f.writable():
            f.fsync()

    @_fuse_errors
    def release(self, fh):
        entry = self._files.get(fh)
        if entry is not None:
            try:
                entry[0].close()
            finally:  # dropped only after close, so getattr never sees neither the handle nor the settled length
                with self._lock:
                    self._files.pop(fh, None)
