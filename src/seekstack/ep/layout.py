"""Routing layout: which ranks and experts each token goes to, computed from `topk_idx` in plain torch.

>>> import torch
>>> idx = torch.tensor([[0, 3], [2, -1]])
>>> per_rank, per_rdma, per_expert, in_rank = compute_dispatch_layout(idx, num_experts=4, num_ranks=2)
>>> per_rank.tolist(), per_expert.tolist(), in_rank.tolist()
([1, 2], [1, 0, 1, 1], [[True, True], [False, True]])
"""

from __future__ import annotations

import torch

# Ranks per NVLink domain in DeepEP (NUM_MAX_NVL_PEERS); more ranks than this means an inter-node ("RDMA") layout.
NUM_MAX_NVL_PEERS = 8


def check_topk_idx(topk_idx: object, num_experts: int, name: str = "topk_idx") -> torch.Tensor:
    """Validate `[T, K]` integer expert ids in [-1, num_experts); returns it as int64."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_tokens, num_topk] tensor")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be int64 (or int32), got {topk_idx.dtype}")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        lo, hi = int(topk_idx.min()), int(topk_idx.max())
        raise ValueError(f"{name} values must lie in [-1, {num_experts}), got [{lo}, {hi}]")
    return topk_idx.long()


def compute_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`(num_tokens_per_rank[R], num_tokens_per_rdma_rank[R/8] | None, num_tokens_per_expert[E], is_token_in_rank)`.

    Counts are int32 (DeepEP's dtypes); a token counts once per rank however many of its experts live there.
    """
    if num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})")
    idx = check_topk_idx(topk_idx, num_experts)
    experts_per_rank = num_experts // num_ranks
    valid = idx >= 0
    num_tokens_per_expert = torch.bincount(idx[valid], minlength=num_experts).to(torch.int32)
    # One extra column catches the -1 entries, then is dropped.
    dest = torch.where(valid, idx // experts_per_rank, torch.full_like(idx, num_ranks))
    hit = torch.zeros(idx.shape[0], num_ranks + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, dest, True)
    is_token_in_rank = hit[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_rdma_rank = None
    if num_ranks > NUM_MAX_NVL_PEERS:
        if num_ranks % NUM_MAX_NVL_PEERS:
            raise ValueError(f"more than {NUM_MAX_NVL_PEERS} ranks must be a multiple of {NUM_MAX_NVL_PEERS}")
        per_node = is_token_in_rank.view(-1, num_ranks // NUM_MAX_NVL_PEERS, NUM_MAX_NVL_PEERS).any(2)
        num_tokens_per_rdma_rank = per_node.sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank
