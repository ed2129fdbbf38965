"""Routing information from mgmtd (chains, their versions and target states, node and meta addresses), cached.

>>> # cache = RoutingCache("127.0.0.1:9000", pool); await cache.refresh(); cache.chain(1)["version"]
"""

from __future__ import annotations

import asyncio
import time

from seekstack.fs.protocol import ClientPool, RpcError

SERVING, SYNCING = "serving", "syncing"


class RoutingCache:
    def __init__(self, mgmtd_addr: str, pool: ClientPool):
        self.mgmtd_addr = mgmtd_addr
        self.pool = pool
        self.info: dict = {"version": -1, "chains": {}, "metas": [], "nodes": {}}
        self._last = 0.0
        self._lock = asyncio.Lock()

    @property
    def mgmtd(self):
        return self.pool.get(self.mgmtd_addr)

    async def refresh(self, min_interval: float = 0.02) -> dict:
        """Fetch routing unless it was fetched less than `min_interval` s ago; keeps the old one if mgmtd is down."""
        async with self._lock:
            if time.monotonic() - self._last < min_interval:
                return self.info
            try:
                info = await self.mgmtd.call("routing", timeout=5.0)
                if info["version"] >= self.info["version"] or info.get("epoch") != self.info.get("epoch"):
                    self.info = info
            except RpcError:
                pass
            self._last = time.monotonic()
            return self.info

    def set(self, info: dict):
        self.info = info
        self._last = time.monotonic()

    def chain(self, cid: int) -> dict:
        return self.info["chains"][str(cid)]

    def chain_ids(self) -> list[int]:
        return sorted(int(c) for c in self.info["chains"])

    def writers(self, cid: int) -> list[dict]:
        """Targets that take writes, head first: serving, then syncing (write-only)."""
        return [t for t in self.chain(cid)["targets"] if t["state"] in (SERVING, SYNCING)]

    def readers(self, cid: int) -> list[dict]:
        """Serving targets whose node address is known (a node that never registered has none)."""
        return [t for t in self.chain(cid)["targets"] if t["state"] == SERVING and t["addr"]]
