"""`seekstack fs ...`: run a local cluster and use it.

    seekstack fs up --data DIR [--storage-nodes 3 --replicas 3 --targets-per-node 4] [--foreground]
    seekstack fs down --data DIR
    seekstack fs status --data DIR
    seekstack fs ls|stat|cat|rm|mkdir 3fs:/path --data DIR
    seekstack fs cp SRC DST --data DIR           (local path or 3fs:/path on either side)

`--data` defaults to $SEEKSTACK_FS_DATA.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat as _stat
import sys
import time

PREFIX = "3fs:"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seekstack fs", description="the 3FS-style distributed file system")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--data", default=os.environ.get("SEEKSTACK_FS_DATA"), help="cluster state directory")
        return sp

    up = add("up", "start a local cluster (one process per service) and return once it serves")
    up.add_argument("--storage-nodes", type=int, default=3)
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--targets-per-node", type=int, default=4)
    up.add_argument("--metas", type=int, default=1)
    up.add_argument("--chunk-size", type=int, default=1 << 20)
    up.add_argument("--stripe", type=int, default=0, help="chains per file (0: all)")
    up.add_argument("--kv", default=None, help="meta KV store URL (default: SQLite under --data)")
    up.add_argument("--lease", type=float, default=2.0, help="heartbeat lease in seconds")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the cluster")
    add("down", "stop the cluster recorded under --data")
    # mount/umount parse their own arguments (seekstack.fs.fuse.main); listed here for --help.
    for name, help_ in [("mount", "mount the cluster with FUSE: MOUNTPOINT --data DIR"), ("umount", "unmount")]:
        sub.add_parser(name, help=help_, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    add("status", "nodes, chains and target states")
    ls = add("ls", "list a directory")
    ls.add_argument("path")
    ls.add_argument("-l", action="store_true", help="long listing")
    for name, help_ in [("cat", "print a file"), ("stat", "show an inode")]:
        add(name, help_).add_argument("path")
    rm = add("rm", "remove a file or directory")
    rm.add_argument("path")
    rm.add_argument("-r", action="store_true", help="recursive")
    mk = add("mkdir", "create a directory")
    mk.add_argument("path")
    mk.add_argument("-p", action="store_true", help="create parents, no error if it exists")
    cp = add("cp", "copy between the local file system and 3fs:/paths")
    cp.add_argument("src")
    cp.add_argument("dst")
    return p


def _fs_path(p: str) -> str:
    if not p.startswith(PREFIX):
        raise ValueError(f"path: expected a {PREFIX}/... name, got {p!r}")
    return p[len(PREFIX) :] or "/"


def _need_data(args) -> str:
    if not args.data:
        raise ValueError("--data: give the cluster directory (or set SEEKSTACK_FS_DATA)")
    return args.data


def _up(args) -> int:
    from seekstack.fs.cluster import Cluster, running_services

    running = running_services(_need_data(args))
    if running:
        print(
            f"seekstack fs up: a cluster is already running in {args.data} ({', '.join(running)}); "
            "`seekstack fs down` stops it",
            file=sys.stderr,
        )
        return 1

    c = Cluster(
        _need_data(args),
        storage_nodes=args.storage_nodes,
        replicas=args.replicas,
        targets_per_node=args.targets_per_node,
        metas=args.metas,
        lease=args.lease,
        kv=args.kv,
        chunk_size=args.chunk_size,
        stripe=args.stripe,
        detach=not args.foreground,
    )
    t0 = time.perf_counter()
    c.start()
    print(
        f"cluster serving in {time.perf_counter() - t0:.1f} s: mgmtd {c.mgmtd}, "
        f"{args.storage_nodes} storage nodes, data in {c.dir}"
    )
    if not args.foreground:
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    c.stop()
    print("cluster stopped")
    return 0


def _status(args) -> int:
    import json

    from seekstack.fs.protocol import call_sync, read_token

    d = _need_data(args)
    with open(os.path.join(d, "cluster.json")) as f:
        cfg = json.load(f)
    st = call_sync(cfg["mgmtd"], read_token(d), "status")
    print(f"mgmtd {cfg['mgmtd']}  routing version {st['version']}  metas: {', '.join(st['metas']) or '-'}")
    for n, addr in sorted(st["nodes"].items(), key=lambda x: int(x[0])):
        print(f"  storage node {n}  {addr}  {'alive' if st['alive'].get(n) else 'DOWN'}")
    for cid, c in sorted(st["chains"].items(), key=lambda x: int(x[0])):
        targets = "  ".join(f"{t['id']}@{t['node']}:{t['state']}" for t in c["targets"])
        print(f"  chain {cid} v{c['version']}: {targets}")
    return 0


def _cp(fs, src: str, dst: str):
    block = 8 << 20
    if src.startswith(PREFIX):
        fin = fs.open(_fs_path(src), "rb")
    else:
        fin = open(src, "rb")
    if dst.startswith(PREFIX):
        d = _fs_path(dst)
        if fs.isdir(d):
            d = d.rstrip("/") + "/" + os.path.basename(src.rstrip("/"))
        fout = fs.open(d, "wb")
    else:
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
        fout = open(dst, "wb")
    with fin, fout:
        while chunk := fin.read(block):
            fout.write(chunk)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("mount", "umount"):
        from seekstack.fs import fuse

        return (fuse.mount_main if argv[0] == "mount" else fuse.umount_main)(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "up":
            return _up(args)
        if args.cmd == "down":
            from seekstack.fs.cluster import stop_recorded

            print("stopped:", " ".join(stop_recorded(_need_data(args))) or "nothing running")
            return 0
        if args.cmd == "status":
            return _status(args)
        from seekstack.fs.client import connect

        with connect(_need_data(args)) as fs:
            if args.cmd == "ls":
                for e in sorted(fs.scandir(_fs_path(args.path)), key=lambda e: e["name"]):
                    if args.l:
                        st = fs.lstat(_fs_path(args.path).rstrip("/") + "/" + e["name"])
                        print(
                            f"{_stat.filemode(st.st_mode)} {st.st_nlink:3d} {st.st_uid:5d} {st.st_gid:5d} "
                            f"{st.st_size:12d} {e['name']}"
                        )
                    else:
                        print(e["name"] + ("/" if e["type"] == "dir" else ""))
            elif args.cmd == "cat":
                with fs.open(_fs_path(args.path), "rb") as f:
                    while chunk := f.read(8 << 20):
                        sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif args.cmd == "stat":
                st = fs.lstat(_fs_path(args.path))
                print(
                    f"ino {st.st_ino}  {_stat.filemode(st.st_mode)}  nlink {st.st_nlink}  uid {st.st_uid}  "
                    f"gid {st.st_gid}  size {st.st_size}  mtime {time.ctime(st.st_mtime)}"
                )
            elif args.cmd == "rm":
                fs.remove(_fs_path(args.path), recursive=args.r)
            elif args.cmd == "mkdir":
                fs.mkdir(_fs_path(args.path), parents=args.p, exist_ok=args.p)
            elif args.cmd == "cp":
                _cp(fs, args.src, args.dst)
        return 0
    except (OSError, ValueError) as e:
        print(f"seekstack fs {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
