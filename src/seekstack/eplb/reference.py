"""A straightforward per-layer implementation of EPLB's default policy, in plain Python lists.

It is the baseline of `seekstack bench eplb` (the vectorised policy must beat it) and a second, independently
written oracle for the tests: for every input both must return the same placement.
"""

from __future__ import annotations

import numpy as np
import torch


def rebalance_experts_loop(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Same contract as `seekstack.eplb.rebalance_experts` (default options), one layer at a time."""
    weight = torch.as_tensor(weight, dtype=torch.float32).cpu()
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    layers = [_rebalance_layer(row.tolist(), num_replicas, num_groups, num_nodes, num_gpus) for row in weight]
    phy2log = torch.tensor([p for p, _, _ in layers], dtype=torch.int64)
    rank = torch.tensor([r for _, r, _ in layers], dtype=torch.int64)
    logcnt = torch.tensor([c for _, _, c in layers], dtype=torch.int64)
    width = int(logcnt.max())
    log2phy = torch.full((weight.size(0), weight.size(1), width), -1, dtype=torch.int64)
    for y in range(weight.size(0)):
        for s in range(num_replicas):
            log2phy[y, phy2log[y, s], rank[y, s]] = s
    return phy2log, log2phy, logcnt


def _greedy_pack(loads: list[float], num_packs: int) -> list[tuple[int, int]]:
    """(pack, rank in pack) for each item: heaviest first into the lightest pack with room."""
    cap = len(loads) // num_packs
    pack_load = [np.float32(0.0)] * num_packs  # float32 like the vectorised path, so near-ties resolve alike
    pack_size = [0] * num_packs
    out = [(-1, -1)] * len(loads)
    for item in sorted(range(len(loads)), key=lambda i: -loads[i]):
        pack = min((p for p in range(num_packs) if pack_size[p] < cap), key=lambda p: pack_load[p])
        out[item] = (pack, pack_size[pack])
        pack_load[pack] = np.float32(pack_load[pack] + np.float32(loads[item]))
        pack_size[pack] += 1
    return out


def _rebalance_layer(w: list[float], num_slots: int, num_groups: int, num_nodes: int, num_gpus: int):
    num_logical = len(w)
    group_size = num_logical // num_groups
    slots_per_node, gpus_per_node = num_slots // num_nodes, num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus
    group_loads = [_f32_sum(w[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    node_of_group = _greedy_pack(group_loads, num_nodes)
    # Experts of each node, in the order their groups were placed there.
    node_experts: list[list[int]] = [[] for _ in range(num_nodes)]
    for g, _ in sorted(enumerate(node_of_group), key=lambda kv: kv[1]):
        node_experts[node_of_group[g][0]].extend(range(g * group_size, (g + 1) * group_size))

    phy2log = [0] * num_slots
    rank = [0] * num_slots
    logcnt = [0] * num_logical
    for node, experts in enumerate(node_experts):
        count = [1] * len(experts)
        slots = list(range(len(experts)))  # local expert index of each slot
        slot_rank = [0] * len(experts)
        for _ in range(slots_per_node - len(experts)):
            per_replica = [_f32_div(w[e], c) for e, c in zip(experts, count)]
            best = max(range(len(experts)), key=lambda i: (per_replica[i], -i))
            slots.append(best)
            slot_rank.append(count[best])
            count[best] += 1
        loads = [_f32_div(w[experts[i]], count[i]) for i in slots]
        for s, (gpu, k) in enumerate(_greedy_pack(loads, gpus_per_node)):
            phys = node * slots_per_node + gpu * slots_per_gpu + k
            phy2log[phys] = experts[slots[s]]
            rank[phys] = slot_rank[s]
        for i, e in enumerate(experts):
            logcnt[e] = count[i]
    return phy2log, rank, logcnt


def _f32_sum(values: list[float]) -> float:
    # Match the vectorised path, which sums and divides in float32, so ties and orderings agree exactly.
    return float(torch.tensor(values, dtype=torch.float32).sum())


def _f32_div(a: float, b: int) -> float:
    return float(torch.tensor(a, dtype=torch.float32) / b)
