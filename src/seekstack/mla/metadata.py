"""The split-KV work plan: FlashMLA's tile scheduler (`get_decoding_sched_meta.cu`), computed on the host.

Each request's keys are cut into 64-token scheduling blocks; a request also costs a fixed overhead of 5 blocks (its
q load, its output write, a combine). The blocks of all requests, in order, are dealt to `num_sm_parts` workers as
contiguous (request, block) ranges of about `ceil(total / parts) + 5` blocks each; a request whose blocks cross a
worker boundary is split, and its pieces are merged afterwards by the combine step.

One row of `tile_scheduler_metadata` (int32, 8 wide) describes one worker's range:

    [begin_req, begin_token, end_req, end_token, begin_split, 0, 0, 0]

The worker handles tokens [begin_token, ...) of `begin_req`, every token of the requests strictly between, and
tokens [..., end_token) of `end_req`; `begin_split` is the index, among `begin_req`'s pieces, of its first piece.
`num_splits` (int32, [requests + 1]) is the prefix sum of each request's number of pieces, so a request with
`num_splits[i+1] - num_splits[i] == 1` is never split and is written straight to the output.

Workers are the device's SMs on CUDA (divided among KV heads and 64-row query tiles, as FlashMLA does) and torch's
threads on CPU. The plan depends on the *values* of `cache_seqlens`, so it is built once per decoding step and reused
by every layer.

>>> import torch
>>> meta, splits = get_mla_metadata(torch.tensor([100, 700, 30], dtype=torch.int32), 16, 1, num_sms=4)
>>> splits.tolist()  # request 1 (700 tokens) is cut into 3 pieces
[0, 1, 4, 5]
>>> meta[:, :4].tolist()  # the last worker is left idle
[[0, 0, 1, 64], [1, 64, 1, 576], [1, 576, 2, 30], [3, 0, 2, 30]]
"""

from __future__ import annotations

import math

import torch

TILE_SCHEDULER_METADATA_SIZE = 8
BLOCK_SIZE_M = 64  # query rows per tile of the split-KV kernel, used to size the worker count
BLOCK_SIZE_N = 64  # tokens per scheduling block (independent of the cache's page size)
FIXED_OVERHEAD_NUM_BLOCKS = 5


def num_sm_parts_for(num_sms: int, rows_per_head_k: int, num_heads_k: int) -> int:
    """Workers per (query tile, KV head): FlashMLA's `num_sms / h_kv / ceil(rows / 64)`, at least 1."""
    return max(num_sms // num_heads_k // math.ceil(max(rows_per_head_k, 1) / BLOCK_SIZE_M), 1)


def default_num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return torch.get_num_threads()


def plan_splits(seqlens: list[int], num_sm_parts: int) -> tuple[list[list[int]], list[int]]:
    """The scheduler itself on plain ints: (metadata rows, num_splits prefix sums)."""
    num_blocks = [math.ceil(n / BLOCK_SIZE_N) for n in seqlens]
    total = sum(num_blocks) + FIXED_OVERHEAD_NUM_BLOCKS * len(seqlens)
    payload = math.ceil(total / num_sm_parts) + FIXED_OVERHEAD_NUM_BLOCKS

    rows: list[list[int]] = []
    num_splits = [0]
    now_idx = now_block = now_split = cum_splits = 0
    batch = len(seqlens)
    for _ in range(num_sm_parts):
        begin = [now_idx, now_block * BLOCK_SIZE_N, now_split]
        remain = payload
        while now_idx < batch:
            remaining_blocks = num_blocks[now_idx] - now_block
            if remain >= remaining_blocks + FIXED_OVERHEAD_NUM_BLOCKS:
                cum_splits += now_split + 1
                num_splits.append(cum_splits)
                remain -= remaining_blocks + FIXED_OVERHEAD_NUM_BLOCKS
                now_idx, now_block, now_split = now_idx + 1, 0, 0
            else:
                if remain - FIXED_OVERHEAD_NUM_BLOCKS > 0:
                    now_block += remain - FIXED_OVERHEAD_NUM_BLOCKS
                    now_split += 1
                break
        if now_block > 0:
            end_idx, end_token = now_idx, now_block * BLOCK_SIZE_N
        else:
            end_idx = now_idx - 1
            end_token = seqlens[end_idx] if end_idx >= 0 else 0
        rows.append([begin[0], begin[1], end_idx, end_token, begin[2], 0, 0, 0])
    if (now_idx, now_block, now_split) != (batch, 0, 0):  # pragma: no cover - the payload always leaves slack
        raise RuntimeError("split-KV scheduler left work unassigned")
    return rows, num_splits


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_heads_per_head_k: int,
    num_heads_k: int,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    *,
    num_sms: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's `get_mla_metadata`: (tile_scheduler_metadata int32 [parts, 8], num_splits int32 [requests + 1]).

    `num_heads_per_head_k` is `s_q * h_q // h_kv`. For sparse decoding pass `topk` and `num_heads_q`: each of the
    `b * s_q` query tokens then attends to its own `topk` slots and is scheduled as a request of length `topk`.
    `num_sms` overrides the worker budget (the SM count on CUDA, torch's thread count on CPU).
    `is_fp8_kvcache` is accepted for compatibility; the plan does not depend on it.
    """
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1:
        raise ValueError("cache_seqlens must be a 1-D int32 tensor [b]")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if num_heads_per_head_k < 1 or num_heads_k < 1:
        raise ValueError("num_heads_per_head_k and num_heads_k must be >= 1")
    del is_fp8_kvcache
    b = cache_seqlens.shape[0]
    if topk is None:
        seqlens = cache_seqlens.tolist()
        if any(n < 0 for n in seqlens):
            raise ValueError("cache_seqlens must be >= 0")
        rows_per_head_k = num_heads_per_head_k
    else:
        if num_heads_q is None or num_heads_q % num_heads_k:
            raise ValueError("num_heads_q (a multiple of num_heads_k) is required with topk")
        rows_per_head_k = num_heads_q // num_heads_k
        if num_heads_per_head_k % rows_per_head_k:
            raise ValueError("num_heads_per_head_k must be s_q * num_heads_q // num_heads_k")
        s_q = num_heads_per_head_k // rows_per_head_k
        seqlens = [int(topk)] * (b * s_q)
    num_sms = default_num_sms(cache_seqlens.device) if num_sms is None else int(num_sms)
    parts = num_sm_parts_for(num_sms, rows_per_head_k, num_heads_k)
    rows, num_splits = plan_splits(seqlens, parts)
    device = cache_seqlens.device
    return (
        torch.tensor(rows, dtype=torch.int32, device=device).view(parts, TILE_SCHEDULER_METADATA_SIZE),
        torch.tensor(num_splits, dtype=torch.int32, device=device),
    )


def plan_segments(
    tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor, seqlens: list[int]
) -> list[list[tuple[int, int, int, int]]]:
    """Read a plan back: per worker, its (request, token_begin, token_end, split_index) pieces."""
    splits = num_splits.tolist()
    parts = []
    for begin_idx, begin_tok, end_idx, end_tok, begin_split, *_ in tile_scheduler_metadata.tolist():
        pieces = []
        for r in range(begin_idx, end_idx + 1):
            start = begin_tok if r == begin_idx else 0
            stop = end_tok if r == end_idx else seqlens[r]
            pieces.append((r, start, stop, splits[r] + (begin_split if r == begin_idx else 0)))
        parts.append(pieces)
    return parts
