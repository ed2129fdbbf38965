"""`seekstack fs mount MOUNTPOINT --data DIR` and `seekstack fs umount MOUNTPOINT`.

`mount` starts a daemon (this module with `--foreground`, in its own session) and returns once the mount is live;
the daemon unmounts cleanly on SIGTERM/SIGINT and exits when the mount goes away (`umount`, `fusermount3 -u`).

>>> # mount_main(["/mnt/3fs", "--data", "/tmp/3fs"]); open("/mnt/3fs/x", "w").write("hi"); umount_main(["/mnt/3fs"])
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def is_mounted(mountpoint) -> bool:
    """True when `mountpoint` is listed in /proc/mounts. Never touches the path itself: a stat of a FUSE mount
    point whose daemon is not serving (e.g. from inside that daemon) blocks forever."""
    target = os.path.normpath(os.path.abspath(mountpoint))
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                    return True
    except OSError:
        pass
    return False


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Mount the cluster with FUSE (pyfuse3 over libfuse3).")
    p.add_argument("mountpoint", help="an existing empty directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data", help="the cluster's data directory (as for `seekstack fs up`); default $SEEKSTACK_FS_DATA"
    )
    src.add_argument("--local", help="serve a plain local directory instead of a cluster (testing, comparisons)")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground (this process serves)")
    p.add_argument("--threads", type=int, default=16, help="worker threads for client calls (default 16)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the mount to appear")
    p.add_argument("--debug", action="store_true", help="log FUSE requests")
    return p


def _client(args):
    if args.local:
        from seekstack.fs.usrbio.localdir import LocalDirClient

        return LocalDirClient(args.local)
    from seekstack.fs.client import connect

    return connect(args.data)


def serve(client, mountpoint: str, threads: int = 16, debug: bool = False) -> None:
    """Serve `client` at `mountpoint` until SIGTERM/SIGINT (then unmount) or until someone else unmounts it."""
    import pyfuse3
    import trio

    from seekstack.fs.fuse.ops import FsOperations

    ops = FsOperations(client, threads=threads)
    options = set(pyfuse3.default_options) | {"fsname=seekstack", "subtype=3fs"}
    if debug:
        options.add("debug")
    pyfuse3.init(ops, mountpoint, options)

    async def run():
        async with trio.open_nursery() as nursery:

            async def on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # the mount went away (umount): stop waiting for signals

    unmount = True
    try:
        trio.run(run)
        unmount = is_mounted(mountpoint)
    finally:
        pyfuse3.close(unmount=unmount)
        client.close()


def mount_main(argv: list[str] | None = None) -> int:
    args = _parser("seekstack fs mount").parse_args(argv)
    mp = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mp):
        print(f"mountpoint: {mp} is not a directory", file=sys.stderr)
        return 2
    if is_mounted(mp):
        print(f"mountpoint: something is already mounted at {mp}", file=sys.stderr)
        return 1
    if args.local is None and not (args.data or os.environ.get("SEEKSTACK_FS_DATA")):
        print("--data: give the cluster's data directory (or set SEEKSTACK_FS_DATA)", file=sys.stderr)
        return 2
    if args.foreground:
        serve(_client(args), mp, args.threads, args.debug)
        return 0
    cmd = [sys.executable, "-m", "seekstack.fs.fuse.main", mp, "--foreground", "--threads", str(args.threads)]
    cmd += ["--local", os.path.abspath(args.local)] if args.local else []
    cmd += ["--data", os.path.abspath(args.data)] if args.data else []
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    # Own session: the daemon outlives this command and terminal signals do not reach it.
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + args.timeout
    while not is_mounted(mp):
        if proc.poll() is not None:
            print(f"mount failed:\n{proc.stderr.read().decode(errors='replace')}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            proc.terminate()
            print(f"mount: {mp} did not appear within {args.timeout} s", file=sys.stderr)
            return 1
        time.sleep(0.02)
    proc.stderr.close()
    print(f"mounted at {mp} (daemon pid {proc.pid})")
    return 0


def umount_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="seekstack fs umount", description="Unmount a `seekstack fs mount`.")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the mount to disappear")
    args = p.parse_args(argv)
    mp = os.path.abspath(args.mountpoint)
    if not is_mounted(mp):
        print(f"mountpoint: nothing is mounted at {mp}", file=sys.stderr)
        return 1
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mp] if tool else ["umount", mp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"umount failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while is_mounted(mp) and time.monotonic() < deadline:
        time.sleep(0.02)
    return 0 if not is_mounted(mp) else 1


if __name__ == "__main__":
    sys.exit(mount_main(sys.argv[1:]))
