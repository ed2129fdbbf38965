"""Plain-PyTorch EP reference: the tests' oracle, written without the row transport of `Buffer`.

Layouts are built with Python loops, every field travels in its own `all_to_all_single` (fp8 as uint8), and
combines add row by row in fp32, lowest rank (or top-k slot) first, then cast — DeepEP's semantics: the sum of the
per-rank partials in fp32, rounded once to bf16. Slow, but obviously right; `Buffer` must match it bit for bit.
Tensors stay on their device (CPU with gloo, CUDA with NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _a2a(group, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    wire = rows.view(torch.uint8) if rows.element_size() == 1 else rows
    out = torch.empty((sum(recv_splits), *rows.shape[1:]), dtype=wire.dtype, device=rows.device)
    dist.all_to_all_single(out, wire.contiguous(), recv_splits, send_splits, group=group)
    return out.view(rows.dtype)


def _tokens_per_rank(topk_idx: torch.Tensor, experts_per_rank: int, num_ranks: int) -> list[list[int]]:
    lists: list[list[int]] = [[] for _ in range(num_ranks)]
    for t, row in enumerate(topk_idx.tolist()):
        for r in sorted({e // experts_per_rank for e in row if e >= 0}):
            lists[r].append(t)
    return lists


def reference_dispatch(group, x, topk_idx, topk_weights, num_experts):
    """Returns `(recv_x | (fp8, scales), recv_topk_idx, recv_topk_weights, recv_src_idx, state)`."""
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    El = num_experts // R
    dev = topk_idx.device
    tokens = _tokens_per_rank(topk_idx, El, R)
    send_splits = [len(t) for t in tokens]
    counts = torch.empty(R, dtype=torch.int64, device=dev)
    dist.all_to_all_single(counts, torch.tensor(send_splits, dtype=torch.int64, device=dev), group=group)
    recv_splits = counts.tolist()
    order = torch.tensor([t for ts in tokens for t in ts], dtype=torch.int64, device=dev)

    def move(field):
        return _a2a(group, field[order], send_splits, recv_splits)

    if isinstance(x, tuple):
        recv_x = (move(x[0]), move(x[1].contiguous()))
    else:
        recv_x = move(x)
    glob = move(topk_idx.long())
    local = glob - rank * El
    mine = (glob >= 0) & (local >= 0) & (local < El)
    recv_idx = torch.where(mine, local, torch.full_like(local, -1))
    recv_w = None
    if topk_weights is not None:
        recv_w = torch.where(mine, move(topk_weights), torch.zeros((), device=dev))
    num_tokens = x[0].shape[0] if isinstance(x, tuple) else x.shape[0]
    recv_src = move(torch.arange(num_tokens, dtype=torch.int32, device=dev))
    state = (tokens, send_splits, recv_splits)
    return recv_x, recv_idx, recv_w, recv_src, state


def reference_combine(group, y, state, num_tokens, topk_weights=None, biases=()):
    """Unweighted fp32 sum of each token's returned copies, lowest rank first, then the biases."""
    tokens, send_splits, recv_splits = state
    back = _a2a(group, y, recv_splits, send_splits)
    back_w = None if topk_weights is None else _a2a(group, topk_weights, recv_splits, send_splits)
    acc = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
    accw = None
    if back_w is not None:
        accw = torch.zeros(num_tokens, topk_weights.shape[1], dtype=torch.float32, device=y.device)
    i = 0
    for ts in tokens:
        for t in ts:
            acc[t] += back[i].float()
            if accw is not None:
                accw[t] += back_w[i]
            i += 1
    for b in biases:
        acc += b.float()
    return acc.to(y.dtype), accw


def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, H = x.shape
    b = x.float().view(T, H // 128, 128)
    s = b.abs().amax(2).clamp(min=1e-4) / 448.0
    return (b / s[:, :, None]).to(torch.float8_e4m3fn).view(T, H), s


def _gather(group, t: torch.Tensor) -> torch.Tensor:
    R = dist.get_world_size(group)
    wire = t.view(torch.uint8) if t.element_size() == 1 else t
    out = torch.empty((R, *wire.shape), dtype=wire.dtype, device=t.device)
    dist.all_to_all_single(out, wire.unsqueeze(0).expand(R, *wire.shape).contiguous(), group=group)
    return out.view(t.dtype)


def reference_low_latency_dispatch(group, x, topk_idx, num_max, num_experts, use_fp8):
    """Masked layout built by looping over (source rank, token, k): `(recv_x | (q, s), recv_count, slots)`."""
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    El = num_experts // R
    T, H = x.shape
    dev = x.device
    pad = torch.full((num_max - T, topk_idx.shape[1]), -1, dtype=torch.int64, device=dev)
    all_idx = _gather(group, torch.cat([topk_idx.long(), pad]))
    if use_fp8:
        q, s = _quant(x)
        all_q = _gather(group, torch.cat([q, torch.zeros(num_max - T, H, dtype=q.dtype, device=dev)]))
        all_s = _gather(group, torch.cat([s, torch.zeros(num_max - T, H // 128, device=dev)]))
        out = torch.zeros(El, R * num_max, H, dtype=torch.float8_e4m3fn, device=dev)
        out_s = torch.zeros(El, R * num_max, H // 128, device=dev)
    else:
        all_x = _gather(group, torch.cat([x, torch.zeros(num_max - T, H, dtype=x.dtype, device=dev)]))
        out = torch.zeros(El, R * num_max, H, dtype=torch.bfloat16, device=dev)
    count = [0] * El
    all_idx_list = all_idx.tolist()
    for src in range(R):
        for t in range(num_max):
            for g in all_idx_list[src][t]:
                if g >= 0 and g // El == rank:
                    e = g - rank * El
                    if use_fp8:
                        out[e, count[e]] = all_q[src, t]
                        out_s[e, count[e]] = all_s[src, t]
                    else:
                        out[e, count[e]] = all_x[src, t]
                    count[e] += 1
    recv = (out, out_s) if use_fp8 else out
    return recv, torch.tensor(count, dtype=torch.int32, device=dev)


def reference_low_latency_combine(group, y, topk_idx, topk_weights, num_max, num_experts):
    """`Σ_k w[t,k] · y(t,k)` in fp32 with k ascending; each rank locates its slots from everyone's routing."""
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    El = num_experts // R
    T, K = topk_idx.shape
    dev = y.device
    pad = torch.full((num_max - T, K), -1, dtype=torch.int64, device=dev)
    all_idx = _gather(group, torch.cat([topk_idx.long(), pad])).tolist()
    all_y = _gather(group, y)  # [R, El, R*num_max, H]
    # slot[(src, t, k)] = row of that pair in its expert's masked block
    slot: dict[tuple[int, int, int], int] = {}
    count = [0] * num_experts
    for src in range(R):
        for t in range(num_max):
            for k, g in enumerate(all_idx[src][t]):
                if g >= 0:
                    slot[(src, t, k)] = count[g]
                    count[g] += 1
    acc = torch.zeros(T, y.shape[2], dtype=torch.float32, device=dev)
    for t in range(T):
        for k, g in enumerate(topk_idx[t].tolist()):
            if g >= 0:
                acc[t] += all_y[g // El, g % El, slot[(rank, t, k)]].float() * topk_weights[t, k]
    return acc.to(torch.bfloat16)
