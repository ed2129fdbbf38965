"""Launch a local cluster: one process per service (mgmtd, meta, storage nodes) on 127.0.0.1, state under one
directory, with kill/restart hooks for reliability tests.

>>> # with Cluster("/tmp/fs", storage_nodes=3, replicas=3) as c:
>>> #     fs = c.connect(); fs.write_bytes("/x", b"data")
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from seekstack.fs.protocol import RpcError, call_sync


class Cluster:
    def __init__(
        self,
        data_dir,
        *,
        storage_nodes: int = 3,
        replicas: int = 3,
        targets_per_node: int = 4,
        metas: int = 1,
        lease: float = 2.0,
        kv: str | None = None,
        chunk_size: int = 1 << 20,
        stripe: int = 0,
        detach: bool = False,
        client_timeout: float = 10.0,
    ):
        if storage_nodes < 1:
            raise ValueError(f"storage_nodes must be >= 1, got {storage_nodes}")
        if not 1 <= replicas <= storage_nodes:
            raise ValueError(f"replicas must be in [1, storage_nodes={storage_nodes}], got {replicas}")
        if metas < 1:
            raise ValueError(f"metas must be >= 1, got {metas}")
        self.dir = Path(data_dir).absolute()
        self.storage_nodes, self.replicas, self.targets_per_node = storage_nodes, replicas, targets_per_node
        self.metas, self.lease, self.kv = metas, lease, kv
        self.chunk_size, self.stripe = chunk_size, stripe
        # detach=False (tests, demo, bench): services die with this process; detach=True (`fs up`): they outlive it.
        self.detach = detach
        self.client_timeout = client_timeout
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.token = ""
        self.mgmtd = ""

    # ---------------------------------------------------------------- processes
    def names(self) -> list[str]:
        return ["mgmtd"] + [f"meta{i}" for i in range(self.metas)] + [f"storage{i}" for i in range(self.storage_nodes)]

    def _argv(self, name: str) -> list[str]:
        base = [sys.executable, "-m", "seekstack.fs.server"]
        common = [
            "--data",
            str(self.dir),
            "--port",
            str(self.ports.get(name, 0)),
            "--name",
            name,
            "--lease",
            str(self.lease),
        ]
        if name == "mgmtd":
            return base + [
                "mgmtd",
                *common,
                "--nodes",
                str(self.storage_nodes),
                "--replicas",
                str(self.replicas),
                "--targets-per-node",
                str(self.targets_per_node),
            ]
        if name.startswith("meta"):
            extra = ["--kv", self.kv] if self.kv else []
            return base + [
                "meta",
                *common,
                "--mgmtd",
                self.mgmtd,
                "--chunk-size",
                str(self.chunk_size),
                "--stripe",
                str(self.stripe),
                "--client-timeout",
                str(self.client_timeout),
                *extra,
            ]
        return base + ["storage", *common, "--mgmtd", self.mgmtd, "--node", name[len("storage") :]]

    def spawn(self, name: str, wait: float = 30.0) -> int:
        """Start (or restart, on its old port) one service; returns its port once it serves."""
        self._launch(name)
        return self._await_port(name, wait)

    def _launch(self, name: str):
        port_file = self.dir / "run" / f"{name}.port"
        port_file.unlink(missing_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("SEEKSTACK_FS_DIE_WITH", None)
        if not self.detach:
            env["SEEKSTACK_FS_DIE_WITH"] = str(os.getpid())
        # A new session: `fs up` returns while the services keep running, and signals to us do not reach them.
        p = subprocess.Popen(
            self._argv(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = p

    def _await_port(self, name: str, wait: float) -> int:
        p, port_file = self.procs[name], self.dir / "run" / f"{name}.port"
        deadline = time.monotonic() + wait
        while not port_file.exists():
            if p.poll() is not None:
                tail = (self.dir / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {p.returncode} while starting:\n{tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not start within {wait} s")
            time.sleep(0.02)
        self.ports[name] = int(port_file.read_text())
        self._write_config()
        return self.ports[name]

    def _write_config(self):
        cfg = {
            "mgmtd": self.mgmtd,
            "ports": self.ports,
            "pids": {n: p.pid for n, p in self.procs.items()},
            "storage_nodes": self.storage_nodes,
            "replicas": self.replicas,
            "targets_per_node": self.targets_per_node,
            "client_timeout": self.client_timeout,
            "metas": self.metas,
            "lease": self.lease,
            "kv": self.kv,
            "chunk_size": self.chunk_size,
            "stripe": self.stripe,
        }
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=1))
        os.replace(tmp, self.dir / "cluster.json")

    def start(self, timeout: float = 60.0) -> Cluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        tok = self.dir / "token"
        if not tok.exists():
            fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_hex(16).encode())
            os.close(fd)
        self.token = tok.read_text().strip()
        if not self.detach:
            atexit.register(self.stop)
        old = self.dir / "cluster.json"
        if old.exists():  # a restart of a stopped cluster keeps its ports, so old clients find it again
            self.ports = {k: v for k, v in json.loads(old.read_text()).get("ports", {}).items() if k in self.names()}
        try:
            self.mgmtd = f"127.0.0.1:{self.spawn('mgmtd')}"
            for name in self.names()[1:]:  # start in parallel: interpreter start-up dominates
                self._launch(name)
            for name in self.names()[1:]:
                self._await_port(name, 30.0)
            self.wait_serving(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str, sig: int = signal.SIGKILL):
        """Send `sig` to one service (default kill -9) and, for a fatal signal, wait for it to exit."""
        p = self.procs.get(name)
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
                p.wait(10)

    def restart(self, name: str) -> int:
        self.kill(name)
        return self.spawn(name)

    def stop(self):
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()

    # ---------------------------------------------------------------- state
    def status(self) -> dict:
        return call_sync(self.mgmtd, self.token, "status")

    def wait_serving(self, timeout: float = 60.0) -> dict:
        """Poll until every target is serving and every meta has registered."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                states = [t["state"] for c in last["chains"].values() for t in c["targets"]]
                if all(s == "serving" for s in states) and len(last["metas"]) >= self.metas:
                    return last
            except (RpcError, OSError):
                pass
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {self.dir / 'logs' / name}.log")
            time.sleep(0.05)
        raise TimeoutError(f"cluster not serving after {timeout} s: {last}")

    def connect(self, **kw):
        from seekstack.fs.client import connect

        return connect(self.dir, **kw)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def running_services(data_dir) -> dict[str, int]:
    """Services recorded in DIR/cluster.json that are still running: {name: pid}."""
    d = Path(data_dir).absolute()
    try:
        cfg = json.loads((d / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, pid in cfg.get("pids", {}).items():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "seekstack.fs.server" in cmd and str(d) in cmd and _running(pid):
            out[name] = pid
    return out


def stop_recorded(data_dir) -> list[str]:
    """Stop the services recorded in DIR/cluster.json (for `fs down`): SIGTERM, then SIGKILL after 10 s."""
    alive = running_services(data_dir)
    for pid in alive.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in alive.values():
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    return list(alive)


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (our services' parent may be gone, and nobody may reap them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
