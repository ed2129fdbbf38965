"""Chain tables and the public-state transition rules, as pure functions (mgmtd applies them every tick).

Public states (what clients and storage see): serving (read/write), syncing (write only, being resynced),
waiting (back but nothing to sync from), lastsrv (the last serving target died with it), offline.
Local states (mgmtd's view of a target): uptodate, online (alive, needs resync), offline (no heartbeat).

>>> next_states([("serving", "offline"), ("serving", "uptodate")])
['offline', 'serving']
"""

from __future__ import annotations

SERVING, SYNCING, WAITING, LASTSRV, OFFLINE = "serving", "syncing", "waiting", "lastsrv", "offline"
UPTODATE, ONLINE = "uptodate", "online"
_ORDER = {SERVING: 0, SYNCING: 1, LASTSRV: 2, WAITING: 3, OFFLINE: 4}


def make_chain_table(nodes: int, replicas: int, targets_per_node: int) -> tuple[dict, dict]:
    """Chains of `replicas` targets on distinct nodes; target id = node * 100 + k. Returns (chains, targets) where
    chains = {chain_id: {"version", "targets": [tid...]}} and targets = {tid: {"node", "chain", "state"}}."""
    if replicas < 1 or nodes < replicas:
        raise ValueError(f"replicas must be in [1, nodes={nodes}], got {replicas}")
    if targets_per_node < 1:
        raise ValueError(f"targets_per_node must be >= 1, got {targets_per_node}")
    if (nodes * targets_per_node) % replicas:
        raise ValueError("nodes * targets_per_node must be a multiple of replicas")
    free = {n: [(n + 1) * 100 + k for k in range(targets_per_node)] for n in range(nodes)}
    heads = dict.fromkeys(range(nodes), 0)  # greedy first guess; _balance_heads fixes what it leaves uneven
    chains, targets = {}, {}
    for c in range(nodes * targets_per_node // replicas):
        # Nodes with the most free targets (rotating ties); the head, which takes the write load, goes to the
        # candidate that heads the fewest chains so far.
        cand = sorted(range(nodes), key=lambda n: (-len(free[n]), (n - c) % nodes))[:replicas]
        head = min(cand, key=lambda n: (heads[n], (n - c) % nodes))
        heads[head] += 1
        order = [head] + sorted((n for n in cand if n != head), key=lambda n: (n - c) % nodes)
        tids = [free[n].pop(0) for n in order]
        cid = c + 1
        chains[cid] = {"version": 1, "targets": tids}
        for n, t in zip(order, tids, strict=True):
            targets[t] = {"node": n, "chain": cid, "state": SERVING}
    _balance_heads(chains, targets, nodes)
    return chains, targets


def _balance_heads(chains: dict, targets: dict, nodes: int):
    """Even out how many chains each node heads: move one head along an augmenting path (a chain headed by u
    that contains v hands its head role to v) from the busiest node to one with at least two fewer, until none
    exists. Loads in the middle of a path do not change, so each move lowers the spread."""

    def node(t):
        return targets[t]["node"]

    while True:
        load = dict.fromkeys(range(nodes), 0)
        for c in chains.values():
            load[node(c["targets"][0])] += 1
        hi = max(load, key=load.get)
        prev: dict[int, tuple[int, int] | None] = {hi: None}
        queue, found = [hi], None
        while queue and found is None:
            u = queue.pop(0)
            for cid, c in chains.items():
                if node(c["targets"][0]) != u:
                    continue
                for t in c["targets"][1:]:
                    v = node(t)
                    if v not in prev:
                        prev[v] = (u, cid)
                        queue.append(v)
                        if load[v] <= load[hi] - 2:
                            found = v
        if found is None:
            return
        v = found
        while prev[v] is not None:
            u, cid = prev[v]
            tids = chains[cid]["targets"]
            i = next(k for k, t in enumerate(tids) if node(t) == v)
            tids[0], tids[i] = tids[i], tids[0]
            v = u


def next_states(chain: list[tuple[str, str]]) -> list[str]:
    """New public states for one chain given (public, local) per target, in chain order."""
    any_serving = any(p == SERVING and loc != OFFLINE for p, loc in chain)
    # When every serving target is gone, exactly one of them (every one holds all committed writes) becomes lastsrv.
    need_lastsrv = not any_serving and not any(p == LASTSRV for p, _ in chain)
    out = []
    for pub, loc in chain:
        if pub == SERVING:
            if loc == OFFLINE:
                out.append(LASTSRV if need_lastsrv else OFFLINE)
                need_lastsrv = False
            else:
                out.append(SERVING)
        elif pub == SYNCING:
            if loc == OFFLINE:
                out.append(OFFLINE)
            elif loc == UPTODATE:
                out.append(SERVING)
            else:
                out.append(SYNCING if any_serving else WAITING)
        elif pub == LASTSRV:
            out.append(LASTSRV if loc == OFFLINE else SERVING)
        else:  # offline / waiting
            if loc == OFFLINE:
                out.append(OFFLINE if pub == OFFLINE else WAITING)
            else:
                out.append(SYNCING if any_serving else WAITING)
    return out


def reorder(tids: list[int], states: dict[int, str]) -> list[int]:
    """Serving targets first (relative order kept), then syncing, then the rest: failed targets go to the end."""
    return sorted(tids, key=lambda t: _ORDER[states[t]])
