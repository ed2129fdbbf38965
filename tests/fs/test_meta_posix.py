"""Meta semantics in-process (MetaStore on SQLite) against the local file system as the POSIX reference: the same
random operations must give the same errno, and the same final tree."""

from __future__ import annotations

import errno
import os
import random
import stat
import threading

import pytest

from seekstack.fs.kv import open_store
from seekstack.fs.meta.store import ROOT, MetaStore, User

NAMES = ["a", "b", "c", "a/b", "a/c", "b/a", "a/b/c", "c/a", "a/x", "b/x/y"]
LINK_TARGETS = ["a", "b", "x", "b/x", "c/a"]


def _errno(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno


class Pair:
    """Runs each operation on the local directory `ref` and on `meta`, returning both errnos."""

    def __init__(self, meta: MetaStore, ref: str):
        self.meta, self.ref = meta, ref

    def r(self, p):
        return os.path.join(self.ref, p)

    def m(self, p):
        return "/" + p

    def op(self, name, *paths, **kw):
        meta, r, m = self.meta, self.r, self.m
        table = {
            "mkdir": (lambda: os.mkdir(r(paths[0]), 0o755), lambda: meta.mkdir(m(paths[0]), 0o755, ROOT)),
            "rmdir": (lambda: os.rmdir(r(paths[0])), lambda: meta.rmdir(m(paths[0]), ROOT)),
            "create": (
                lambda: os.close(os.open(r(paths[0]), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)),
                lambda: meta.close(*self._open_excl(m(paths[0]))),
            ),
            "unlink": (lambda: os.unlink(r(paths[0])), lambda: meta.unlink(m(paths[0]), ROOT)),
            "rename": (
                lambda: os.rename(r(paths[0]), r(paths[1])),
                lambda: meta.rename(m(paths[0]), m(paths[1]), ROOT),
            ),
            "link": (
                lambda: os.link(r(paths[0]), r(paths[1]), follow_symlinks=False),
                lambda: meta.link(m(paths[0]), m(paths[1]), ROOT),
            ),
            "symlink": (
                lambda: os.symlink(kw["target"], r(paths[0])),
                lambda: meta.symlink(kw["target"], m(paths[0]), ROOT),
            ),
            "truncate": (
                lambda: os.truncate(r(paths[0]), kw.get("length", 0)),
                lambda: meta.truncate(m(paths[0]), kw.get("length", 0), ROOT),
            ),
            "stat": (lambda: os.stat(r(paths[0])), lambda: meta.stat(m(paths[0]), ROOT)),
            "listdir": (lambda: os.listdir(r(paths[0])), lambda: meta.listdir(m(paths[0]), ROOT)),
        }
        ref_fn, meta_fn = table[name]
        return _errno(ref_fn), _errno(meta_fn)

    def _open_excl(self, p):
        r = self.meta.open(p, ROOT, read=False, write=True, create=True, excl=True)
        return r["stat"]["ino"], r["session"], None

    def tree(self):
        """{path: (type, size, nlink, link target)} of both sides, symlinks not followed."""
        ref = {}
        for dirpath, dirnames, filenames in os.walk(self.ref):
            for n in dirnames + filenames:
                full = os.path.join(dirpath, n)
                st = os.lstat(full)
                rel = os.path.relpath(full, self.ref)
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode) else "file"
                tgt = os.readlink(full) if kind == "symlink" else ""
                ref[rel] = (kind, st.st_size if kind == "file" else 0, st.st_nlink if kind == "file" else 0, tgt)
        ours = {}

        def walk(path, rel):
            for e in self.meta.listdir(path, ROOT):
                p, q = path.rstrip("/") + "/" + e["name"], (rel + "/" if rel else "") + e["name"]
                st = self.meta.stat(p, ROOT, follow=False)
                tgt = self.meta.readlink(p, ROOT) if e["type"] == "symlink" else ""
                ours[q] = (
                    e["type"],
                    st["size"] if e["type"] == "file" else 0,
                    st["nlink"] if e["type"] == "file" else 0,
                    tgt,
                )
                if e["type"] == "dir":
                    walk(p, q)

        walk("/", "")
        return ref, ours


@pytest.fixture
def pair(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    meta = MetaStore(open_store(f"sqlite://{tmp_path / 'meta.db'}"), chains=lambda: [1, 2, 3, 4])
    return Pair(meta, str(ref))


@pytest.mark.parametrize("round_", range(4))
def test_random_ops_match_local_fs(pair, seed, round_):
    rng = random.Random(seed + round_)
    log = []
    for step in range(250):
        kind = rng.choice(
            [
                "mkdir",
                "mkdir",
                "create",
                "create",
                "rmdir",
                "unlink",
                "rename",
                "rename",
                "link",
                "symlink",
                "truncate",
                "stat",
                "listdir",
            ]
        )
        a, b = rng.choice(NAMES), rng.choice(NAMES)
        kw = {}
        if kind == "symlink":
            kw["target"] = rng.choice(LINK_TARGETS)
        if kind == "truncate":
            kw["length"] = rng.randrange(0, 5000)
        paths = (a, b) if kind in ("rename", "link") else (a,)
        ref_e, meta_e = pair.op(kind, *paths, **kw)
        log.append((step, kind, paths, kw, ref_e, meta_e))
        assert ref_e == meta_e, f"seed={seed + round_} {log[-5:]}"
    ref, ours = pair.tree()
    assert ref == ours, f"seed={seed + round_}"


@pytest.mark.parametrize(
    "op, path, want",
    [
        ("mkdir", "d/..", errno.EEXIST),
        ("mkdir", "d/.", errno.EEXIST),
        ("rmdir", "d/.", errno.EINVAL),
        ("rmdir", "d/..", errno.ENOTEMPTY),
        ("unlink", "d", errno.EISDIR),
        ("rmdir", "f", errno.ENOTDIR),
        ("mkdir", "f/x", errno.ENOTDIR),
        ("create", "d", errno.EEXIST),
        ("mkdir", "n" * 256, errno.ENAMETOOLONG),
        ("create", "n" * 256, errno.ENAMETOOLONG),
        ("unlink", "missing", errno.ENOENT),
        ("rmdir", "missing/deeper", errno.ENOENT),
        ("stat", "f/", errno.ENOTDIR),
        ("truncate", "d", errno.EISDIR),
        ("listdir", "f", errno.ENOTDIR),
        ("mkdir", "n" * 255, 0),
    ],
)
def test_bad_paths_match_local_fs(pair, op, path, want):
    assert pair.op("mkdir", "d") == (0, 0)
    assert pair.op("create", "f") == (0, 0)
    assert pair.op(op, path) == (want, want)


def test_invalid_paths_raise_errno(pair):
    meta = pair.meta
    for bad, code in [("", errno.ENOENT), ("/a\0b", errno.EINVAL), ("/" + "x/" * 2100, errno.ENAMETOOLONG)]:
        with pytest.raises(OSError) as ei:
            meta.mkdir(bad, 0o755, ROOT)
        assert ei.value.errno == code
    with pytest.raises(OSError) as ei:
        meta.rmdir("/", ROOT)
    assert ei.value.errno == errno.EBUSY
    assert meta.listdir("/", ROOT) == []  # nothing half-done


def test_rename_loop_check_and_atomic_replace(pair):
    meta = pair.meta
    for p in ("/a", "/a/b", "/a/b/c", "/e"):
        meta.mkdir(p, 0o755, ROOT)
    with pytest.raises(OSError) as ei:
        meta.rename("/a", "/a/b/c/z", ROOT)
    assert ei.value.errno == errno.EINVAL
    meta.rename("/a/b", "/e/b", ROOT)
    assert meta.stat("/e/b/c", ROOT)["type"] == "dir"
    assert meta.stat("/e", ROOT)["nlink"] == 3 and meta.stat("/a", ROOT)["nlink"] == 2
    with pytest.raises(OSError) as ei:
        meta.rename("/e", "/e/b/c/q", ROOT)
    assert ei.value.errno == errno.EINVAL
    # Replace a file atomically; the old inode becomes garbage (its chunks must be removed).
    r1 = meta.open("/f1", ROOT, write=True, create=True)
    r2 = meta.open("/f2", ROOT, write=True, create=True)
    meta.close(r1["stat"]["ino"], r1["session"], 10)
    meta.close(r2["stat"]["ino"], r2["session"], 20)
    gc = meta.rename("/f1", "/f2", ROOT)
    assert gc["id"] == r2["stat"]["ino"]
    assert meta.stat("/f2", ROOT)["ino"] == r1["stat"]["ino"] and meta.stat("/f2", ROOT)["size"] == 10


def test_unlink_while_open_defers_deletion(pair):
    meta = pair.meta
    r = meta.open("/f", ROOT, write=True, create=True)
    assert meta.unlink("/f", ROOT) is None  # a writer still has it open
    gone = meta.close(r["stat"]["ino"], r["session"], 5)
    assert gone is not None and gone["id"] == r["stat"]["ino"]


def test_symlinks_and_hard_links(pair):
    meta = pair.meta
    meta.mkdir("/d", 0o755, ROOT)
    meta.symlink("d", "/l", ROOT)
    meta.symlink("/l/loop", "/d/loop", ROOT)
    meta.symlink("loop2", "/loop1", ROOT)
    meta.symlink("loop1", "/loop2", ROOT)
    assert meta.stat("/l", ROOT)["type"] == "dir" and meta.stat("/l", ROOT, follow=False)["type"] == "symlink"
    with pytest.raises(OSError) as ei:
        meta.stat("/loop1", ROOT)
    assert ei.value.errno == errno.ELOOP
    r = meta.open("/l/f", ROOT, write=True, create=True)  # created through the link
    meta.close(r["stat"]["ino"], r["session"], 0)
    meta.link("/d/f", "/h", ROOT)
    assert meta.stat("/h", ROOT)["nlink"] == 2
    with pytest.raises(OSError) as ei:
        meta.link("/d", "/h2", ROOT)
    assert ei.value.errno == errno.EPERM
    assert meta.readlink("/l", ROOT) == "d"


def test_owner_and_mode_bits(pair):
    meta = pair.meta
    alice, bob = User(1000, 1000), User(1001, 1001)
    meta.mkdir("/home", 0o755, ROOT)
    with pytest.raises(PermissionError):
        meta.mkdir("/home/alice", 0o755, alice)
    meta.mkdir("/home/alice", 0o700, ROOT)
    meta.setattr("/home/alice", ROOT, uid=1000, gid=1000)
    r = meta.open("/home/alice/secret", alice, write=True, create=True, mode=0o600)
    meta.close(r["stat"]["ino"], r["session"], 0)
    assert meta.stat("/home/alice/secret", alice)["uid"] == 1000
    with pytest.raises(PermissionError):
        meta.stat("/home/alice/secret", bob)  # no search permission on /home/alice
    meta.setattr("/home/alice", alice, mode=0o755)
    with pytest.raises(PermissionError):
        meta.open("/home/alice/secret", bob, read=True)
    with pytest.raises(PermissionError):
        meta.setattr("/home/alice/secret", bob, mode=0o777)  # only the owner may chmod
    with pytest.raises(PermissionError):
        meta.setattr("/home/alice/secret", alice, uid=1001)  # only root gives files away
    with pytest.raises(PermissionError):
        meta.unlink("/home/alice/secret", bob)
    meta.setattr("/home/alice/secret", alice, mode=0o644)
    assert meta.open("/home/alice/secret", bob, read=True)["session"] is None
    with pytest.raises(PermissionError):
        meta.open("/home/alice/secret", bob, read=True, write=True)


def test_concurrent_meta_instances_share_one_store(tmp_path):
    """Several MetaStores (as several meta processes would) race on one SQLite file: creates in one directory and
    renames of one file must all serialize, with unique inode ids and no lost or duplicated entries."""
    url = f"sqlite://{tmp_path / 'shared.db'}"
    metas = [MetaStore(open_store(url), chains=lambda: [1, 2]) for _ in range(4)]
    metas[0].mkdir("/d", 0o755, ROOT)
    metas[0].close(
        *[(r["stat"]["ino"], r["session"], 0) for r in [metas[0].open("/d/token0", ROOT, write=True, create=True)]][0]
    )
    inos, errors = [], []

    def worker(k):
        m = metas[k]
        for i in range(25):
            r = m.open(f"/d/f{k}_{i}", ROOT, write=True, create=True, excl=True)
            inos.append(r["stat"]["ino"])
            m.close(r["stat"]["ino"], r["session"], 0)
            # Pass the token file around: exactly one rename of each generation can succeed.
            for g in range(40):
                try:
                    m.rename(f"/d/token{g}", f"/d/token{g + 1}", ROOT)
                    break
                except FileNotFoundError:
                    continue
                except OSError as e:  # pragma: no cover - reported below
                    errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(inos)) == 100
    names = [e["name"] for e in metas[1].listdir("/d", ROOT)]
    tokens = [n for n in names if n.startswith("token")]
    assert len(tokens) == 1 and len(names) == 101


def test_retried_requests_apply_once(pair):
    """A request retried with the same id (the reply was lost) returns the first result instead of failing."""
    meta = pair.meta
    first = meta.with_request("0000000001aa", meta.mkdir, "/once", 0o755, ROOT)
    again = meta.with_request("0000000001aa", meta.mkdir, "/once", 0o755, ROOT)
    assert again == first
    with pytest.raises(FileExistsError):
        meta.with_request("0000000001bb", meta.mkdir, "/once", 0o755, ROOT)  # a new request does fail
    meta.with_request("0000000002aa", meta.rename, "/once", "/twice", ROOT)
    assert meta.with_request("0000000002aa", meta.rename, "/once", "/twice", ROOT) is None
    assert [e["name"] for e in meta.listdir("/", ROOT)] == ["twice"]
    assert meta.prune_requests(max_age=0) == 2  # failed requests leave no record
    assert meta.prune_requests(max_age=0) == 0
