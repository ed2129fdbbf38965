"""`rebalance_experts`: EPLB's hierarchical and global placement policies.

Hierarchical (used when num_groups % num_nodes == 0, e.g. prefill): expert groups are packed onto nodes, experts are
replicated within each node, and the replicas are packed onto that node's GPUs — so a group's traffic stays on one
node. Global (otherwise, e.g. decode): the same three steps with one group and one node.

Shape legend: Y layers, L logical experts, S physical slots (num_replicas), G groups, N nodes.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
import torch

from seekstack.eplb.packing import balanced_packing
from seekstack.eplb.replication import replicate_experts


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    distinct_per_gpu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place `num_replicas` physical experts on `num_gpus` GPUs for the load statistics `weight` [layers, experts].

    Returns, as CPU int64 tensors (API of deepseek-ai/EPLB):
      - `phy2log` [layers, num_replicas]: the logical expert of each physical slot; slot g·(S/num_gpus)+k is the
        k-th expert on GPU g, and GPUs [n·num_gpus/num_nodes, (n+1)·num_gpus/num_nodes) form node n;
      - `log2phy` [layers, experts, max(logcnt)]: the physical slots of each expert's replicas, padded with -1;
      - `logcnt` [layers, experts]: each expert's replica count.

    `distinct_per_gpu=True` (beyond upstream, deepseek-ai/EPLB#22) never puts two replicas of one expert on one GPU.

    >>> weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
    >>> phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
    >>> phy2log.tolist()
    [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """
    weight_YL = _check_weight(weight)
    num_layers, num_logical = weight_YL.shape
    for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                        ("num_gpus", num_gpus)):  # fmt: skip
        _check_positive_int(name, value)
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas ({num_replicas}) must be >= the number of experts ({num_logical})")
    if num_logical % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the number of experts ({num_logical})")

    if num_groups % num_nodes == 0:
        if num_gpus % num_nodes:
            raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
        phy2log, phy_rank, logcnt = _hierarchical(weight_YL, num_replicas, num_groups, num_nodes, num_gpus,
                                                  distinct_per_gpu)  # fmt: skip
    else:
        phy2log, phy_rank, logcnt = _hierarchical(weight_YL, num_replicas, 1, 1, num_gpus, distinct_per_gpu)

    max_count = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical * max_count), -1, dtype=torch.int64)
    slots = torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1)
    log2phy.scatter_(1, phy2log * max_count + phy_rank, slots)
    return phy2log, log2phy.view(num_layers, num_logical, max_count), logcnt


def _hierarchical(weight_YL, num_slots, num_groups, num_nodes, num_gpus, distinct_per_gpu):
    num_layers, num_logical = weight_YL.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_slots // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_slots // num_gpus
    if distinct_per_gpu and slots_per_node > experts_per_node * gpus_per_node:
        raise ValueError(
            f"distinct_per_gpu: {slots_per_node} slots per node cannot hold distinct experts on {gpus_per_node} "
            f"GPUs with {experts_per_node} experts per node; lower num_replicas"
        )

    # Step 1: pack groups onto nodes. "mlog" numbers experts node by node, so each node's experts are contiguous.
    group_load_YG = weight_YL.view(num_layers, num_groups, group_size).sum(-1)
    group_node, group_rank = balanced_packing(group_load_YG, num_nodes)
    group_first_mlog_YG = (group_node * groups_per_node + group_rank) * group_size
    log2mlog_YL = (group_first_mlog_YG.unsqueeze(-1) + torch.arange(group_size)).flatten(1)
    mlog2log_YL = _inverse(log2mlog_YL)

    # Step 2: replicate experts within each node (rows = layers × nodes).
    mlog_load = weight_YL.gather(1, mlog2log_YL).view(num_layers * num_nodes, experts_per_node)
    cap = gpus_per_node if distinct_per_gpu else None
    slot2mlog, slot_rank, mlog_count = replicate_experts(mlog_load, slots_per_node, max_replicas=cap)

    # Step 3: pack each node's replicas onto its GPUs, by per-replica load (tokens split evenly among replicas).
    replica_load = (mlog_load / mlog_count).gather(1, slot2mlog)
    labels = slot2mlog if distinct_per_gpu else None
    gpu, rank_on_gpu = balanced_packing(replica_load, gpus_per_node, labels)
    slot2pslot = gpu * slots_per_gpu + rank_on_gpu
    pslot2slot = _inverse(slot2pslot)

    pslot2mlog = slot2mlog.gather(1, pslot2slot).view(num_layers, num_nodes, slots_per_node)
    pslot2mlog = (pslot2mlog + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)).flatten(1)
    phy2log = mlog2log_YL.gather(1, pslot2mlog)
    phy_rank = slot_rank.gather(1, pslot2slot).view(num_layers, num_slots)
    logcnt = mlog_count.view(num_layers, num_logical).gather(1, log2mlog_YL)
    return phy2log, phy_rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=perm.dtype).expand_as(perm))
    return inv


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_weight(weight) -> torch.Tensor:
    if isinstance(weight, np.ndarray):
        weight = torch.from_numpy(weight)
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"weight must be a [layers, experts] array of loads: {exc}") from exc
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be 2-D [layers, experts] and non-empty, got shape {tuple(weight.shape)}")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise ValueError(f"weight must be real-valued, got {weight.dtype}")
    weight = weight.detach().to("cpu", torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite (found NaN or inf)")
    if bool((weight < 0).any()):
        raise ValueError(f"weight must be non-negative (min {float(weight.min())})")
    return weight


def default_placement(num_experts: int, num_gpus: int) -> torch.Tensor:
    """The placement without EPLB: one replica per expert, experts split over GPUs in contiguous ranges.

    Returns `phy2log` [num_experts] and requires num_experts % num_gpus == 0 (the usual EP layout).
    """
    if num_experts % num_gpus:
        raise ValueError(f"num_gpus ({num_gpus}) must divide the number of experts ({num_experts})")
    return torch.arange(num_experts, dtype=torch.int64)


def padded_replicas(num_experts: int, num_gpus: int, redundant_per_gpu: int = 1) -> int:
    """A common choice of num_replicas: every GPU gets ceil(experts / gpus) + `redundant_per_gpu` slots."""
    return (math.ceil(num_experts / num_gpus) + redundant_per_gpu) * num_gpus
