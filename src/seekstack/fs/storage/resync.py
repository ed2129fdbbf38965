"""Resync: bring a returning (syncing) target up to date from the last serving target of its chain.

3FS's rules: dump the target's chunk metadata, diff it with ours, and per chunk (under the chunk lock, so
concurrent writes are ordered around it) send what is only here or differs, delete what is only there; then
report sync-done to the target and to mgmtd, which makes it serving. Writes arriving meanwhile reach the syncing
target as full-chunk replaces, so it never depends on its own stale copy.
"""

from __future__ import annotations

import asyncio

from seekstack.fs.protocol import RpcError
from seekstack.fs.routing import SERVING, SYNCING


def start_resyncs(node) -> None:
    """Start a resync for every syncing target of each chain whose last serving target lives on `node`."""
    for cid, c in node.routing.info["chains"].items():
        serving = [t for t in c["targets"] if t["state"] == SERVING]
        if not serving or serving[-1]["id"] not in node.engines or not node.insync.get(serving[-1]["id"]):
            continue
        for t in c["targets"]:
            if t["state"] == SYNCING and t["id"] not in node.resyncing:
                node.resyncing[t["id"]] = asyncio.create_task(resync(node, int(cid), serving[-1]["id"], t))


def needs_send(local, remote: list[int] | None) -> bool:
    """Local chunk vs the target's [chain_ver, committed, pending, crc]: send unless it is the same version
    and bytes with nothing pending there."""
    if remote is None:
        return True
    chain_ver, committed, pending, crc = remote
    return committed != local.committed or crc != local.crc or pending != 0 or chain_ver < local.chain_ver


async def resync(node, cid: int, src: int, dst: dict) -> None:
    try:
        client = node.pool.get(dst["addr"])
        remote = (await client.call("dump_meta", target=dst["id"], timeout=60.0))["chunks"]
        eng = node._engine(src)
        for chunk in sorted(set(eng.dump()) | set(remote)):
            async with node._lock(chunk):
                c = eng.get(chunk)
                ver = node.routing.chain(cid)["version"]
                if c is None or c.committed == 0:
                    if chunk in remote:
                        await client.call(
                            "sync_replace", target=dst["id"], chunk=chunk, ver=0, chain_ver=ver, remove=True
                        )
                elif needs_send(c, remote.get(chunk)):
                    await client.call(
                        "sync_replace", eng.read(chunk), target=dst["id"], chunk=chunk, ver=c.committed, chain_ver=ver
                    )
        await client.call("sync_done", target=dst["id"])
        await node.routing.mgmtd.call("sync_done", target=dst["id"])
    except (RpcError, KeyError):
        pass  # retried on the next heartbeat round
    finally:
        node.resyncing.pop(dst["id"], None)
