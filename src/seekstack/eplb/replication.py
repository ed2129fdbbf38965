"""Replicate heavy experts: each extra slot goes to the expert whose per-replica load (load / count) is largest.

Shape legend: R rows, L logical experts, S physical slots.
"""

from __future__ import annotations

import torch


def replicate_experts(
    weight_RL: torch.Tensor, num_slots: int, max_replicas: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give L experts `num_slots` ≥ L physical slots, greedily minimising the maximum per-replica load.

    Slot i < L holds expert i; later slots hold the redundant replicas. With `max_replicas`, no expert gets more
    than that many replicas (used to keep replicas on distinct GPUs).

    Returns `(slot2log_RS, replica_rank_RS, count_RL)`, int64: the expert of each slot, which replica of it the
    slot is (0-based), and each expert's replica count.

    >>> slot2log, rank, count = replicate_experts(torch.tensor([[10.0, 1.0, 4.0]]), 5)
    >>> slot2log.tolist(), count.tolist()
    ([[0, 1, 2, 0, 2]], [[2, 1, 2]])
    """
    num_rows, num_logical = weight_RL.shape
    assert num_slots >= num_logical
    rows = torch.arange(num_rows)
    slot2log = torch.arange(num_slots, dtype=torch.int64).repeat(num_rows, 1)
    replica_rank = torch.zeros(num_rows, num_slots, dtype=torch.int64)
    count = torch.ones(num_rows, num_logical, dtype=torch.int64)
    for slot in range(num_logical, num_slots):
        per_replica = weight_RL / count
        if max_replicas is not None:
            per_replica = per_replica.masked_fill(count >= max_replicas, -torch.inf)
        expert_R = per_replica.argmax(dim=-1)  # first maximum on ties
        slot2log[:, slot] = expert_R
        replica_rank[:, slot] = count[rows, expert_R]
        count[rows, expert_R] += 1
    return slot2log, replica_rank, count
