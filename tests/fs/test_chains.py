"""mgmtd's chain table and public-state transitions (pure functions)."""

from __future__ import annotations

import pytest

from seekstack.fs.mgmtd.chains import make_chain_table, next_states, reorder


def test_chain_table_spreads_replicas_and_heads():
    chains, targets = make_chain_table(nodes=5, replicas=3, targets_per_node=6)
    assert len(chains) == 10 and len(targets) == 30
    for c in chains.values():
        nodes = [targets[t]["node"] for t in c["targets"]]
        assert len(set(nodes)) == 3  # replicas on distinct nodes
    heads = [targets[c["targets"][0]]["node"] for c in chains.values()]
    assert sorted(heads.count(n) for n in range(5)) == [2] * 5  # write load spread evenly
    chains, targets = make_chain_table(nodes=4, replicas=3, targets_per_node=3)
    heads = [targets[c["targets"][0]]["node"] for c in chains.values()]
    assert max(heads.count(n) for n in range(4)) - min(heads.count(n) for n in range(4)) <= 1
    assert sorted(targets) == sorted(t for c in chains.values() for t in c["targets"])  # each target once
    for bad in [
        dict(nodes=2, replicas=3, targets_per_node=1),
        dict(nodes=3, replicas=2, targets_per_node=1),
        dict(nodes=3, replicas=3, targets_per_node=0),
    ]:
        with pytest.raises(ValueError):
            make_chain_table(**bad)


@pytest.mark.parametrize(
    "chain, want",
    [
        # one replica fails: it goes offline, the others keep serving
        ([("serving", "uptodate"), ("serving", "offline"), ("serving", "uptodate")], ["serving", "offline", "serving"]),
        # all fail at once: exactly one becomes the last server
        ([("serving", "offline"), ("serving", "offline"), ("serving", "offline")], ["lastsrv", "offline", "offline"]),
        # the last server returns: it serves again without a sync (it has every committed write)
        ([("lastsrv", "online"), ("offline", "offline")], ["serving", "offline"]),
        # a returning target with a serving peer syncs; without one it waits
        ([("serving", "uptodate"), ("offline", "online")], ["serving", "syncing"]),
        ([("lastsrv", "offline"), ("offline", "online")], ["lastsrv", "waiting"]),
        ([("serving", "uptodate"), ("waiting", "online")], ["serving", "syncing"]),
        # sync finished; or the syncing target died again
        ([("serving", "uptodate"), ("syncing", "uptodate")], ["serving", "serving"]),
        ([("serving", "uptodate"), ("syncing", "offline")], ["serving", "offline"]),
        ([("serving", "uptodate"), ("syncing", "online")], ["serving", "syncing"]),
    ],
)
def test_transitions(chain, want):
    assert next_states(chain) == want


def test_failed_targets_move_to_the_end():
    states = {1: "offline", 2: "serving", 3: "syncing", 4: "serving"}
    assert reorder([1, 2, 3, 4], states) == [2, 4, 3, 1]
