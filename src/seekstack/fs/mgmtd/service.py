"""mgmtd: membership (heartbeats = lease renewals), the chain table and target states, routing for everyone.

State that must survive a restart (chains, target states, node addresses, the routing version) lives in a KV
store; heartbeat times live in memory, and a restarted mgmtd gives every node one lease of grace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
import uuid

from seekstack.fs.kv.sqlite import SqliteStore
from seekstack.fs.mgmtd import chains as ch
from seekstack.fs.protocol import RpcServer

STATE_KEY = b"CONFcluster"


class Mgmtd:
    def __init__(
        self,
        data_dir: str,
        token: str,
        *,
        nodes: int = 3,
        replicas: int = 3,
        targets_per_node: int = 4,
        lease: float = 2.0,
    ):
        self.kv = SqliteStore(os.path.join(data_dir, "mgmtd.db"))
        self.token, self.lease = token, lease
        self.epoch = uuid.uuid4().hex[:8]
        raw = self.kv.read(lambda t: t.get(STATE_KEY))
        if raw is None:
            chains, targets = ch.make_chain_table(nodes, replicas, targets_per_node)
            self.state = {
                "version": 1,
                "config": {"nodes": nodes, "replicas": replicas, "targets_per_node": targets_per_node},
                "chains": {str(k): v for k, v in chains.items()},
                "targets": {str(k): v for k, v in targets.items()},
                "nodes": {},
            }
            self._persist()
        else:
            self.state = json.loads(raw)
        now = time.monotonic()
        # One lease of grace after a (re)start, also for nodes that have not registered yet.
        self.last_seen = {str(n): now for n in range(self.state["config"]["nodes"])}
        self.local = {
            t: (ch.UPTODATE if v["state"] == ch.SERVING else ch.ONLINE) for t, v in self.state["targets"].items()
        }
        self.metas: dict[str, float] = {}
        self.clients: dict[str, float] = {}  # client id -> last heartbeat (memory only; see live_clients)
        self.booted = now
        self.server = RpcServer(
            {
                "routing": self.routing,
                "register": self.register,
                "heartbeat": self.heartbeat,
                "heartbeat_meta": self.heartbeat_meta,
                "heartbeat_client": self.heartbeat_client,
                "live_clients": self.live_clients,
                "sync_done": self.sync_done,
                "status": self.status,
            },
            token,
        )

    def _persist(self):
        blob = json.dumps(self.state).encode()
        self.kv.run(lambda t: t.set(STATE_KEY, blob))

    # ---------------------------------------------------------------- RPCs
    async def routing(self, args, payload):
        s = self.state
        now = time.monotonic()
        chains = {}
        for cid, c in s["chains"].items():
            chains[cid] = {
                "version": c["version"],
                "targets": [
                    {
                        "id": int(t),
                        "node": s["targets"][str(t)]["node"],
                        "state": s["targets"][str(t)]["state"],
                        "addr": s["nodes"].get(str(s["targets"][str(t)]["node"]), {}).get("addr", ""),
                    }
                    for t in c["targets"]
                ],
            }
        metas = sorted(a for a, seen in self.metas.items() if now - seen < self.lease)
        return {
            "version": s["version"],
            "epoch": self.epoch,
            "chains": chains,
            "metas": metas,
            "lease": self.lease,
            "nodes": {n: v["addr"] for n, v in s["nodes"].items()},
        }

    async def register(self, args, payload):
        """A storage node (re)starts. A node seen before may have missed writes while down, so its targets are
        taken offline at once (3FS makes a restarted node wait until mgmtd shows them offline) and must resync."""
        nid = str(args["node"])
        if int(nid) >= self.state["config"]["nodes"] or int(nid) < 0:
            raise OSError(errno.EINVAL, f"node id {nid} outside the cluster's {self.state['config']['nodes']} nodes")
        first = nid not in self.state["nodes"]
        self.state["nodes"][nid] = {"addr": args["addr"]}
        mine = [t for t, v in self.state["targets"].items() if str(v["node"]) == nid]
        if not first:
            for t in mine:
                self.local[t] = ch.OFFLINE
            self._update_chains(force_persist=True)
            for t in mine:
                self.local[t] = ch.ONLINE
        else:
            self.state["version"] += 1
            self._persist()
        self.last_seen[nid] = time.monotonic()
        return {
            "first": first,
            "targets": sorted(int(t) for t in mine),
            "routing": await self.routing({}, b""),
            "lease": self.lease,
        }

    async def heartbeat(self, args, payload):
        nid = str(args["node"])
        if nid not in self.state["nodes"]:
            raise OSError(errno.ENOENT, f"node {nid} is not registered")
        self.last_seen[nid] = time.monotonic()
        for t, loc in args.get("targets", {}).items():
            if t in self.local:
                self.local[t] = loc
        self._update_chains()
        return {"version": self.state["version"], "lease": self.lease}

    async def heartbeat_meta(self, args, payload):
        self.metas[args["addr"]] = time.monotonic()
        return {"version": self.state["version"], "lease": self.lease}

    async def heartbeat_client(self, args, payload):
        self.clients[str(args["client"])] = time.monotonic()
        return {}

    async def live_clients(self, args, payload):
        """Clients heard from in the last `within` s, and how long we have been up: a session of a client missing
        from the list is only provably dead once `uptime` exceeds the timeout (we forget clients on restart)."""
        now, timeout = time.monotonic(), float(args["within"])
        self.clients = {c: t for c, t in self.clients.items() if now - t < 10 * timeout}
        return {"clients": [c for c, t in self.clients.items() if now - t < timeout], "uptime": now - self.booted}

    async def sync_done(self, args, payload):
        t = str(args["target"])
        if self.state["targets"].get(t, {}).get("state") == ch.SYNCING:
            self.local[t] = ch.UPTODATE
            self._update_chains()
        return {"state": self.state["targets"][t]["state"]}

    async def status(self, args, payload):
        now = time.monotonic()
        r = await self.routing({}, b"")
        r["alive"] = {n: now - self.last_seen.get(n, -1e9) < self.lease for n in self.state["nodes"]}
        r["config"] = self.state["config"]
        return r

    # ---------------------------------------------------------------- state machine
    def _update_chains(self, force_persist: bool = False):
        now = time.monotonic()
        targets = self.state["targets"]
        for t, v in targets.items():
            nid = str(v["node"])
            if now - self.last_seen.get(nid, -1e9) > self.lease:
                self.local[t] = ch.OFFLINE
        changed = False
        for c in self.state["chains"].values():
            tids = [str(t) for t in c["targets"]]
            new = ch.next_states([(targets[t]["state"], self.local[t]) for t in tids])
            states = dict(zip(tids, new, strict=True))
            order = [int(t) for t in ch.reorder(tids, states)]
            if order != c["targets"] or any(targets[t]["state"] != states[t] for t in tids):
                for t in tids:
                    targets[t]["state"] = states[t]
                c["targets"] = order
                c["version"] += 1
                changed = True
        if changed:
            self.state["version"] += 1
        if changed or force_persist:
            self._persist()

    async def run(self, host: str, port: int, ready=None):
        await self.server.start(host, port)
        if ready:
            ready(self.server.port)
        last = time.monotonic()
        while True:
            await asyncio.sleep(min(0.1, self.lease / 10))
            now = time.monotonic()
            if now - last > self.lease / 2:
                # We were not running (stopped, or starved of CPU): missing heartbeats are our fault, not the
                # nodes', so give everyone a fresh lease instead of failing every target at once.
                self.last_seen = {n: max(t, now) for n, t in self.last_seen.items()}
            last = now
            self._update_chains()
