"""POSIX semantics over a transactional KV store: the stateless core of the metadata service.

Every operation is one serializable transaction (`KVStore.run` retries conflicts), so several meta processes can
share one store. Errors are `OSError`s with the errno Linux gives for the same call. Storage side effects
(trimming or removing chunks) are returned to the caller, which runs them outside the transaction.

>>> from seekstack.fs.kv import open_store
>>> meta = MetaStore(open_store("sqlite://:memory:"), chains=lambda: [1, 2, 3])
>>> _ = meta.mkdir("/data", 0o755, ROOT)
>>> [e["name"] for e in meta.listdir("/", ROOT)]
['data']
"""

from __future__ import annotations

import errno
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

from seekstack.fs.kv import KVStore, Transaction
from seekstack.fs.meta import keys
from seekstack.fs.meta.inode import DIR, FILE, SYMLINK, Inode
from seekstack.fs.meta.layout import Layout

ROOT_INO = 1
NAME_MAX = 255
PATH_MAX = 4096
SYMLOOP_MAX = 40
R, W, X = 4, 2, 1


@dataclass(frozen=True)
class User:
    """The caller's credentials (trusted: requests already carry the cluster token)."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = field(default_factory=tuple)


ROOT = User(0, 0)


def _err(code: int, path: str = "", msg: str = "") -> OSError:
    import os

    return OSError(code, msg or os.strerror(code), path)


def split_path(path: str) -> tuple[list[str], str]:
    """Validated components of an absolute path (`"."` dropped, `".."` kept) and the raw last component."""
    if not isinstance(path, str):
        raise _err(errno.EINVAL, str(path), "path must be a str")
    if "\0" in path:
        raise _err(errno.EINVAL, repr(path), "path contains a NUL byte")
    if path == "":
        raise _err(errno.ENOENT, path)
    if len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise _err(errno.ENAMETOOLONG, path[:64] + "...")
    raw = [c for c in path.split("/") if c]
    for c in raw:
        if len(c.encode("utf-8", "surrogateescape")) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG, path)
    return [c for c in raw if c != "."], (raw[-1] if raw else "/")


class MetaStore:
    """File-system operations on a KV store. `chains()` returns the chain table (chain ids) new files stripe over."""

    def __init__(
        self,
        kv: KVStore,
        chains=lambda: [1],
        chunk_size: int = 1 << 20,
        stripe: int = 0,
        root_owner: tuple[int, int] = (0, 0),
    ):
        self.kv = kv
        self.chains = chains
        self._tls = threading.local()
        self.kv.run(lambda t: self._format(t, chunk_size, stripe, root_owner))

    # ------------------------------------------------------------------ idempotency
    def with_request(self, rid: str | None, fn, *args, **kwargs):
        """Run mutating op `fn` at most once per request id, as 3FS's IDEM records do: a client that retries after
        losing the reply (meta crashed after committing) gets the first result instead of, say, EEXIST. Request
        ids start with a hex timestamp so old records can be pruned by range (`prune_requests`)."""
        self._tls.rid = rid
        try:
            return fn(*args, **kwargs)
        finally:
            self._tls.rid = None

    def _run(self, body):
        rid = getattr(self._tls, "rid", None)
        if not rid:
            return self.kv.run(body)
        key = keys.idem_key(rid)

        def once(t):
            raw = t.get(key)
            if raw is not None:
                return json.loads(raw)["r"]
            result = body(t)
            t.set(key, json.dumps({"r": result}).encode())
            return result

        return self.kv.run(once)

    def prune_requests(self, max_age: float = 3600.0, batch: int = 1000) -> int:
        """Forget request ids older than `max_age` seconds; returns how many were removed."""
        cutoff = keys.idem_key(f"{max(0, int(time.time() - max_age)):010x}")

        def body(t):
            old = t.range(keys.IDEM, cutoff, limit=batch)
            for k, _ in old:
                t.clear(k)
            return len(old)

        return self.kv.run(body)

    # ------------------------------------------------------------------ helpers
    def _format(self, t: Transaction, chunk_size: int, stripe: int, owner: tuple[int, int]):
        """Create the root directory (mode 0755, owned by `owner`) in an empty store."""
        if t.get(keys.inode_key(ROOT_INO)) is None:
            root = Inode(ROOT_INO, DIR, 0o755, owner[0], owner[1], nlink=2, parent=ROOT_INO)
            root.dir_layout = {"chunk_size": chunk_size, "stripe": stripe}
            t.set(keys.inode_key(ROOT_INO), root.encode())
            t.set(keys.single_key("next_inode"), b"2")

    @staticmethod
    def _load(t: Transaction, ino: int) -> Inode:
        raw = t.get(keys.inode_key(ino))
        if raw is None:
            raise _err(errno.ESTALE, str(ino), "inode vanished")
        return Inode.decode(raw)

    @staticmethod
    def _save(t: Transaction, node: Inode):
        t.set(keys.inode_key(node.id), node.encode())

    @staticmethod
    def _lookup(t: Transaction, parent: int, name: str) -> int | None:
        raw = t.get(keys.dent_key(parent, name))
        return None if raw is None else json.loads(raw)["ino"]

    @staticmethod
    def _link(t: Transaction, parent: int, name: str, node: Inode):
        t.set(keys.dent_key(parent, name), json.dumps({"ino": node.id, "type": node.type}).encode())

    @staticmethod
    def _alloc_ino(t: Transaction) -> int:
        k = keys.single_key("next_inode")
        ino = int(t.get(k) or b"2")
        t.set(k, str(ino + 1).encode())
        return ino

    @staticmethod
    def _check(node: Inode, user: User, want: int, path: str = ""):
        if user.uid == 0:
            if want & X and node.type == FILE and not node.mode & 0o111:
                raise _err(errno.EACCES, path)
            return
        if user.uid == node.uid:
            bits = (node.mode >> 6) & 7
        elif node.gid == user.gid or node.gid in user.groups:
            bits = (node.mode >> 3) & 7
        else:
            bits = node.mode & 7
        if bits & want != want:
            raise _err(errno.EACCES, path)

    def _resolve(self, t: Transaction, path: str, user: User, follow: bool = True):
        """Walk `path`; returns (parent inode, last name or None for "/"-like ends, inode or None if missing)."""
        comps, _ = split_path(path)
        must_dir = path.endswith("/")
        cur = self._load(t, ROOT_INO)
        parent, name, node = cur, None, cur
        hops = 0
        while comps:
            c = comps.pop(0)
            if cur.type != DIR:
                raise _err(errno.ENOTDIR, path)
            self._check(cur, user, X, path)
            if c == "..":
                cur = self._load(t, cur.parent)
                parent, name, node = self._load(t, cur.parent), None, cur
                continue
            child = self._lookup(t, cur.id, c)
            if child is None:
                if comps:
                    raise _err(errno.ENOENT, path)
                return cur, c, None
            n = self._load(t, child)
            if n.type == SYMLINK and (comps or follow or must_dir):
                hops += 1
                if hops > SYMLOOP_MAX:
                    raise _err(errno.ELOOP, path)
                target_comps, _ = split_path(n.target)
                if n.target.startswith("/"):
                    cur = self._load(t, ROOT_INO)
                comps = target_comps + comps
                if not comps:  # a link to "/"
                    parent, name, node = cur, None, cur
                continue
            if not comps:
                if must_dir and n.type != DIR:
                    raise _err(errno.ENOTDIR, path)
                return cur, c, n
            cur = n
            parent, name, node = cur, None, cur
        return parent, name, node

    def _existing(self, t, path, user, follow=True) -> Inode:
        _, _, node = self._resolve(t, path, user, follow)
        if node is None:
            raise _err(errno.ENOENT, path)
        return node

    def _new_parent(self, t, path, user, on_exists: int) -> tuple[Inode, str]:
        """Parent and name for creating `path`; raises `on_exists` if it exists (or names "/", "." or "..")."""
        _, last = split_path(path)
        parent, name, node = self._resolve(t, path, user, follow=False)
        if node is not None or name is None or last in (".", ".."):
            raise _err(on_exists, path)
        if parent.type != DIR:
            raise _err(errno.ENOTDIR, path)
        self._check(parent, user, W | X, path)
        if parent.nlink == 0:
            raise _err(errno.ENOENT, path)
        return parent, name

    def _victim(self, t, path, user, root_err: int, dot_errs: tuple[int, int]) -> tuple[Inode, str, Inode]:
        """Parent, name and inode of an existing `path` about to be unlinked/removed/renamed; `dot_errs` are the
        errnos for a last component of "." and "..", `root_err` for "/"."""
        _, last = split_path(path)
        if last in (".", ".."):
            raise _err(dot_errs[last == ".."], path)
        parent, name, node = self._resolve(t, path, user, follow=False)
        if name is None:
            raise _err(root_err, path)
        if node is None:
            raise _err(errno.ENOENT, path)
        self._check(parent, user, W | X, path)
        self._sticky(parent, node, user, path)
        return parent, name, node

    @staticmethod
    def _sticky(parent: Inode, node: Inode, user: User, path: str):
        if parent.mode & 0o1000 and user.uid not in (0, parent.uid, node.uid):
            raise _err(errno.EPERM, path)

    @staticmethod
    def _is_empty(t, ino: int) -> bool:
        return not t.prefix(keys.dent_prefix(ino), limit=1)

    def _drop_link(self, t, node: Inode) -> dict | None:
        """Decrement nlink; delete the inode when unreferenced and not open for write. Returns the inode (as a dict)
        whose chunks must now be removed from storage, if any."""
        now = time.time()
        node.nlink -= 1 if node.type != DIR else node.nlink
        node.ctime = now
        if node.nlink > 0 or (node.type == FILE and t.prefix(keys.session_prefix(node.id), limit=1)):
            self._save(t, node)
            return None
        t.clear(keys.inode_key(node.id))
        return json.loads(node.encode()) if node.type == FILE else None

    # ------------------------------------------------------------------ read-only ops
    def stat(self, path: str, user: User, follow: bool = True) -> dict:
        return self.kv.read(lambda t: self._existing(t, path, user, follow).stat())

    def stat_ino(self, ino: int) -> dict:
        return self.kv.read(lambda t: self._load(t, ino).stat())

    def listdir(self, path: str, user: User) -> list[dict]:
        def body(t):
            node = self._existing(t, path, user)
            if node.type != DIR:
                raise _err(errno.ENOTDIR, path)
            self._check(node, user, R, path)
            plen = len(keys.dent_prefix(node.id))
            out = []
            for k, v in t.prefix(keys.dent_prefix(node.id)):
                d = json.loads(v)
                out.append({"name": k[plen:].decode("utf-8", "surrogateescape"), "ino": d["ino"], "type": d["type"]})
            return out

        return self.kv.read(body)

    def readlink(self, path: str, user: User) -> str:
        def body(t):
            node = self._existing(t, path, user, follow=False)
            if node.type != SYMLINK:
                raise _err(errno.EINVAL, path)
            return node.target

        return self.kv.read(body)

    # ------------------------------------------------------------------ namespace changes
    def mkdir(self, path: str, mode: int, user: User) -> dict:
        def body(t):
            parent, name = self._new_parent(t, path, user, errno.EEXIST)
            node = Inode(self._alloc_ino(t), DIR, mode & 0o7777, user.uid, self._gid(parent, user), nlink=2)
            node.parent, node.dir_layout = parent.id, parent.dir_layout
            parent.nlink += 1
            parent.touch()
            self._save(t, node)
            self._save(t, parent)
            self._link(t, parent.id, name, node)
            return node.stat()

        return self._run(body)

    @staticmethod
    def _gid(parent: Inode, user: User) -> int:
        return parent.gid if parent.mode & 0o2000 else user.gid

    def rmdir(self, path: str, user: User) -> None:
        def body(t):
            parent, name, node = self._victim(t, path, user, errno.EBUSY, (errno.EINVAL, errno.ENOTEMPTY))
            if node.type != DIR:
                raise _err(errno.ENOTDIR, path)
            if not self._is_empty(t, node.id):
                raise _err(errno.ENOTEMPTY, path)
            t.clear(keys.dent_key(parent.id, name))
            t.clear(keys.inode_key(node.id))
            parent.nlink -= 1
            parent.touch()
            self._save(t, parent)

        self._run(body)

    def unlink(self, path: str, user: User) -> dict | None:
        """Remove a non-directory entry; returns the inode whose chunks must be removed (see `_drop_link`)."""

        def body(t):
            parent, name, node = self._victim(t, path, user, errno.EISDIR, (errno.EISDIR, errno.EISDIR))
            if node.type == DIR:
                raise _err(errno.EISDIR, path)
            t.clear(keys.dent_key(parent.id, name))
            parent.touch()
            self._save(t, parent)
            return self._drop_link(t, node)

        return self._run(body)

    def symlink(self, target: str, path: str, user: User) -> dict:
        if not target or "\0" in target:
            raise _err(errno.ENOENT if not target else errno.EINVAL, path)
        if len(target.encode()) >= PATH_MAX:
            raise _err(errno.ENAMETOOLONG, path)

        def body(t):
            parent, name = self._new_parent(t, path, user, errno.EEXIST)
            node = Inode(self._alloc_ino(t), SYMLINK, 0o777, user.uid, self._gid(parent, user))
            node.target, node.length = target, len(target.encode())
            parent.touch()
            self._save(t, node)
            self._save(t, parent)
            self._link(t, parent.id, name, node)
            return node.stat()

        return self._run(body)

    def link(self, src: str, dst: str, user: User) -> dict:
        def body(t):
            node = self._existing(t, src, user, follow=False)
            parent, name = self._new_parent(t, dst, user, errno.EEXIST)
            if node.type == DIR:
                raise _err(errno.EPERM, src)
            node.nlink += 1
            node.ctime = time.time()
            parent.touch()
            self._save(t, node)
            self._save(t, parent)
            self._link(t, parent.id, name, node)
            return node.stat()

        return self._run(body)

    def rename(self, src: str, dst: str, user: User) -> dict | None:
        """Atomic rename with the loop check; returns an inode to garbage-collect if `dst` was a file replaced."""

        def body(t):
            # Like Linux, resolve both parent paths before looking at the last components.
            self._resolve(t, src, user, follow=False)
            self._resolve(t, dst, user, follow=False)
            sparent, sname, snode = self._victim(t, src, user, errno.EBUSY, (errno.EINVAL, errno.EINVAL))
            _, dlast = split_path(dst)
            if dlast in (".", ".."):
                raise _err(errno.EINVAL if dlast == "." else errno.ENOTEMPTY, dst)
            dparent, dname, dnode = self._resolve(t, dst, user, follow=False)
            if dname is None:
                raise _err(errno.EBUSY, dst)
            if dparent.type != DIR:
                raise _err(errno.ENOTDIR, dst)
            self._check(dparent, user, W | X, dst)
            if dnode is not None and dnode.id == snode.id:
                return None  # same inode: POSIX says do nothing
            if dnode is not None and dnode.type == DIR:
                a = sparent  # renaming onto an ancestor of the source: Linux answers ENOTEMPTY first
                while True:
                    if a.id == dnode.id:
                        raise _err(errno.ENOTEMPTY, dst)
                    if a.id == ROOT_INO:
                        break
                    a = self._load(t, a.parent)
            if snode.type == DIR:
                # Loop check: dst's parent must not be src itself or below it.
                a = dparent
                while True:
                    if a.id == snode.id:
                        raise _err(errno.EINVAL, dst, "cannot move a directory into itself")
                    if a.id == ROOT_INO:
                        break
                    a = self._load(t, a.parent)
            gc = None
            if dnode is not None:
                self._sticky(dparent, dnode, user, dst)
                if snode.type == DIR and dnode.type != DIR:
                    raise _err(errno.ENOTDIR, dst)
                if snode.type != DIR and dnode.type == DIR:
                    raise _err(errno.EISDIR, dst)
                if dnode.type == DIR:
                    if not self._is_empty(t, dnode.id):
                        raise _err(errno.ENOTEMPTY, dst)
                    t.clear(keys.inode_key(dnode.id))
                    dparent.nlink -= 1
                else:
                    gc = self._drop_link(t, dnode)
            t.clear(keys.dent_key(sparent.id, sname))
            self._link(t, dparent.id, dname, snode)
            now = time.time()
            if snode.type == DIR and sparent.id != dparent.id:
                snode.parent = dparent.id
                sparent.nlink -= 1
                dparent.nlink += 1
            snode.ctime = now
            self._save(t, snode)
            sparent.touch(now)
            if dparent.id == sparent.id:
                dparent.nlink = sparent.nlink
                self._save(t, sparent)
            else:
                dparent.touch(now)
                self._save(t, sparent)
                self._save(t, dparent)
            return gc

        return self._run(body)

    def setattr(self, path: str, user: User, mode=None, uid=None, gid=None, atime=None, mtime=None, follow=True):
        """chmod/chown/utime: mode and times by the owner or root; uid by root; gid by root or the owner (to a
        group of theirs)."""

        def body(t):
            node = self._existing(t, path, user, follow)
            owner = user.uid in (0, node.uid)
            if mode is not None:
                if not owner:
                    raise _err(errno.EPERM, path)
                node.mode = mode & 0o7777
            if uid is not None and uid != node.uid and user.uid != 0:
                raise _err(errno.EPERM, path)
            if (
                gid is not None
                and gid != node.gid
                and not (user.uid == 0 or (user.uid == node.uid and gid in (user.gid, *user.groups)))
            ):
                raise _err(errno.EPERM, path)
            if (atime is not None or mtime is not None) and not owner:
                raise _err(errno.EPERM, path)
            node.uid = node.uid if uid is None else uid
            node.gid = node.gid if gid is None else gid
            node.atime = node.atime if atime is None else atime
            node.mtime = node.mtime if mtime is None else mtime
            node.ctime = time.time()
            self._save(t, node)
            return node.stat()

        return self._run(body)

    # ------------------------------------------------------------------ files
    def open(
        self,
        path: str,
        user: User,
        *,
        read=True,
        write=False,
        create=False,
        excl=False,
        trunc=False,
        mode=0o644,
        chunk_size: int | None = None,
        stripe: int | None = None,
        client: str = "",
    ) -> dict:
        """Open (and maybe create) a file. Returns {"stat", "layout", "session", "trunc_from"}: a write session is
        recorded under INOS for writers; `trunc_from` is the old length when O_TRUNC cut a non-empty file."""
        if not (read or write):
            raise _err(errno.EINVAL, path, "open needs read or write")

        def body(t):
            parent, name, node = self._resolve(t, path, user, follow=not (create and excl))
            created, trunc_from = False, 0
            if node is None:
                if not create:
                    raise _err(errno.ENOENT, path)
                parent, name = self._new_parent(t, path, user, errno.EEXIST)
                node = self._new_file(t, parent, user, mode, chunk_size, stripe)
                parent.touch()
                self._save(t, parent)
                self._link(t, parent.id, name, node)
                created = True
            else:
                if create and excl:
                    raise _err(errno.EEXIST, path)
                if node.type == DIR:
                    raise _err(errno.EISDIR, path)
                if node.type == SYMLINK:  # dangling link target
                    raise _err(errno.ENOENT, path)
                self._check(node, user, (R if read else 0) | (W if write or trunc else 0), path)
                if trunc and write and node.length:
                    trunc_from, node.length = node.length, 0
                    node.touch()
            session = None
            if write:
                session = uuid.uuid4().hex
                t.set(keys.session_key(node.id, session), json.dumps({"client": client, "ts": time.time()}).encode())
            if created or trunc_from:
                self._save(t, node)
            return {"stat": node.stat(), "layout": node.layout, "session": session, "trunc_from": trunc_from}

        return self._run(body)

    def _new_file(self, t, parent: Inode, user: User, mode: int, chunk_size, stripe) -> Inode:
        chains = sorted(self.chains())
        dl = parent.dir_layout or {}
        cs = int(chunk_size or dl.get("chunk_size") or 1 << 20)
        st = int(stripe or dl.get("stripe") or len(chains))
        st = min(st, len(chains))
        counter = keys.single_key("chain_alloc")
        base = int(t.get(counter) or b"0")
        t.set(counter, str((base + st) % len(chains)).encode())
        layout = Layout(chunk_size=cs, chains=chains, stripe=st, base=base, seed=random.getrandbits(32))
        node = Inode(self._alloc_ino(t), FILE, mode & 0o7777, user.uid, self._gid(parent, user))
        node.layout = layout.to_dict()
        self._save(t, node)
        return node

    def close(self, ino: int, session: str | None, length: int | None = None) -> dict | None:
        """End a write session, adopting the settled `length`; returns an inode to garbage-collect if the file was
        unlinked while open and this was its last writer."""

        def body(t):
            if session is not None:
                t.clear(keys.session_key(ino, session))
            raw = t.get(keys.inode_key(ino))
            if raw is None:
                return None
            node = Inode.decode(raw)
            if length is not None and length != node.length:
                node.length = length
                node.touch()
            if node.nlink == 0 and not t.prefix(keys.session_prefix(ino), limit=1):
                t.clear(keys.inode_key(ino))
                return json.loads(node.encode())
            self._save(t, node)
            return None

        return self._run(body)

    def set_length(self, ino: int, length: int) -> dict:
        """fsync: adopt the length settled from storage."""

        def body(t):
            node = self._load(t, ino)
            if length != node.length:
                node.length = length
                node.touch()
                self._save(t, node)
            return node.stat()

        return self._run(body)

    def truncate(self, path: str, length: int, user: User, session: tuple[int, str] | None = None) -> tuple[dict, int]:
        """Set a file's length; returns (inode as dict, old length) so the caller trims storage chunks. With
        `session=(ino, session id)` it is ftruncate on a file open for writing (found by inode, so a rename since
        open does not matter; the write session stands in for the permission check)."""
        if length < 0:
            raise _err(errno.EINVAL, path)

        def body(t):
            if session is not None:
                if t.get(keys.session_key(*session)) is None:
                    raise _err(errno.EBADF, path, "file is not open for writing")
                node = self._load(t, session[0])
            else:
                node = self._existing(t, path, user)
                if node.type == DIR:
                    raise _err(errno.EISDIR, path)
                self._check(node, user, W, path)
            old = node.length
            node.length = length
            node.touch()
            self._save(t, node)
            return json.loads(node.encode()), old

        return self._run(body)

    def sessions(self, ino: int) -> list[str]:
        plen = len(keys.session_prefix(ino))
        return self.kv.read(lambda t: [k[plen:].decode() for k, _ in t.prefix(keys.session_prefix(ino))])

    def all_sessions(self) -> list[dict]:
        """Every write session (one range scan over INOS): {"ino", "session", "client", "ts"}."""

        def body(t):
            out = []
            for k, v in t.prefix(keys.INOS):
                d = json.loads(v)
                ino = int.from_bytes(k[4:12], "big")
                out.append({"ino": ino, "session": k[12:].decode(), "client": d["client"], "ts": d["ts"]})
            return out

        return self.kv.read(body)

    def layout_of(self, ino: int) -> dict | None:
        raw = self.kv.read(lambda t: t.get(keys.inode_key(ino)))
        return None if raw is None else Inode.decode(raw).layout
