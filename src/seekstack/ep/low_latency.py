"""Low-latency dispatch and combine into DeepEP's masked layout `[E_local, R * max_tokens, H]`.

Dispatch is CPU-sync-free: each rank sends every peer a fixed block of `num_max_dispatch_tokens_per_rank` rows
(one row per token that has any expert there, padding after), so an even `all_to_all_single` needs no count
exchange. The receiver expands each row into one slot per (token, local expert), ordered by source rank, token and
top-k position, which is what a masked grouped GEMM consumes (`recv_count[e]` valid rows per expert).
Combine sends each slot's expert output back (both sides know the split sizes from the routing) and the source
rank adds them weighted by `topk_weights`, in fp32, in top-k order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .events import EventOverlap
from .fp8 import pack_ue8m0, per_token_cast_to_fp8
from .transport import byte_width, pack_rows, start_all_to_all, unpack_field


class LowLatencyHandle(NamedTuple):
    """Fields 0-4 follow DeepEP: `(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts)`.

    `layout_range[e][s]` packs `(begin << 32) | count` of the slots of local expert `e` that came from rank `s`;
    `src_info[e][i]` is the source token index of slot `i`.
    """

    src_info: torch.Tensor  # [E_local, R*max] int32
    layout_range: torch.Tensor  # [E_local, R] int64
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    slot_expert: torch.Tensor  # [P] int64: local expert of each received (token, k) pair, in (src, token, k) order
    slot_pos: torch.Tensor  # [P] int64: its row in the masked layout
    back_splits: tuple[int, ...]  # pairs per source rank (combine send splits)


def _check_common(comm, topk_idx, num_max, num_experts, num_tokens):
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx must be [{num_tokens}, num_topk]")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be int64, got {topk_idx.dtype}")
    if num_experts <= 0 or num_experts % comm.group_size:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of {comm.group_size} ranks")
    if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts})")
    if num_max <= 0 or num_tokens > num_max:
        raise ValueError(f"num_max_dispatch_tokens_per_rank ({num_max}) must be >= the {num_tokens} tokens of x")


def dispatch(
    comm,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max: int,
    num_experts: int,
    cumulative_local_expert_recv_stats,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
    async_finish: bool,
    return_recv_hook: bool,
):
    """See `Buffer.low_latency_dispatch`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.bfloat16:
        raise ValueError("x must be a bf16 [num_tokens, hidden] tensor")
    T, H = x.shape
    _check_common(comm, topk_idx, num_max, num_experts, T)
    if use_fp8 and H % 128:
        raise ValueError(f"hidden ({H}) must be a multiple of 128 for use_fp8")
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("use_ue8m0 needs use_fp8=True and round_scale=True")
    if use_ue8m0 and H % 512:
        raise ValueError(f"use_ue8m0 packs four scales per int32: hidden ({H}) must be a multiple of 512")
    R, rank = comm.group_size, comm.rank
    El = num_experts // R
    K = topk_idx.shape[1]
    idx = topk_idx.long()

    payload = list(per_token_cast_to_fp8(x, round_scale)) if use_fp8 else [x]
    # Source index + 1, so that an all-zero padding row reads as "no token".
    tag = torch.arange(1, T + 1, dtype=torch.int32)
    fields = payload + [idx, tag]
    row_bytes = sum(byte_width(tuple(f.shape[1:]), f.dtype) for f in fields)

    dest = torch.where(idx >= 0, idx // El, R)
    in_rank = torch.zeros(T, R + 1, dtype=torch.bool).scatter_(1, dest, True)[:, :R]
    dest_tok = in_rank.t().nonzero()  # (rank, token), rank-major
    per_rank = in_rank.sum(0)
    # Slot of each sent row inside its destination's fixed block.
    first = torch.cumsum(per_rank, 0) - per_rank
    within = torch.arange(dest_tok.shape[0]) - first[dest_tok[:, 0]]
    positions = dest_tok[:, 0] * num_max + within
    send = torch.empty(R * num_max, row_bytes, dtype=torch.uint8)
    send[:, row_bytes - 4 :].zero_()  # the tag column: padding rows must read as "no token"
    send.index_copy_(0, positions, pack_rows(fields, dest_tok[:, 1].contiguous()))
    recv = torch.empty_like(send)
    work = start_all_to_all(comm.group, recv, send, None, None, "low_latency_dispatch: token exchange")

    slots = R * num_max
    # The masked layout is large (E_local x R*max x H) and mostly padding, so like DeepEP's two alternating
    # buffers it is reused across calls and not cleared: rows past recv_count[e] hold stale data.
    if use_fp8:
        S = H // 128
        recv_data = comm.low_latency_recv_buffer("x", (El, slots, H), torch.float8_e4m3fn)
        # Scales are column-major in the last two dims ("for TMA"), as DeepEP returns them.
        s_cols = S // 4 if use_ue8m0 else S
        s_dtype = torch.int32 if use_ue8m0 else torch.float32
        recv_scales = comm.low_latency_recv_buffer("scales", (El, s_cols, slots), s_dtype).transpose(1, 2)
    else:
        recv_data = comm.low_latency_recv_buffer("x", (El, slots, H), torch.bfloat16)
        recv_scales = None
    recv_count = torch.zeros(El, dtype=torch.int32)
    src_info = torch.full((El, slots), -1, dtype=torch.int32)
    layout_range = torch.zeros(El, R, dtype=torch.int64)
    pairs: dict[str, object] = {}

    def finish() -> None:
        col = 0
        data = unpack_field(recv, col, (H,), payload[0].dtype)
        col += byte_width((H,), payload[0].dtype)
        if use_fp8:
            scl = unpack_field(recv, col, (H // 128,), torch.float32)
            col += 4 * (H // 128)
        glob = unpack_field(recv, col, (K,), torch.int64)
        col += 8 * K
        src = unpack_field(recv, col, (), torch.int32).long() - 1
        mine = (src >= 0)[:, None] & (glob >= rank * El) & (glob < (rank + 1) * El)
        row_k = mine.nonzero()  # (row, k) in (source rank, token, k) order
        rows, ks = row_k[:, 0], row_k[:, 1]
        expert = glob[rows, ks] - rank * El
        # Stable sort by expert keeps (source rank, token, k) order inside each expert.
        by_expert = torch.sort(expert, stable=True).indices
        counts = torch.bincount(expert, minlength=El)
        starts = torch.cumsum(counts, 0) - counts
        pos_sorted = torch.arange(by_expert.numel()) - starts[expert[by_expert]]
        pos = torch.empty_like(pos_sorted)
        pos[by_expert] = pos_sorted
        recv_count.copy_(counts.to(torch.int32))
        src_rank = rows // num_max
        recv_data[expert, pos] = data[rows]
        if use_fp8:
            s = scl[rows]
            recv_scales[expert, pos] = pack_ue8m0(s) if use_ue8m0 else s
        src_info[expert, pos] = src[rows].to(torch.int32)
        per_pair = torch.zeros(El, R, dtype=torch.int64)
        per_pair.index_put_((expert, src_rank), torch.ones_like(expert), accumulate=True)
        begin = torch.cumsum(per_pair, 1) - per_pair
        layout_range.copy_((begin << 32) | per_pair)
        pairs["expert"], pairs["pos"] = expert, pos
        pairs["splits"] = tuple(torch.bincount(src_rank, minlength=R).tolist())
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(recv_count)

    event = EventOverlap([work], finish, (send, recv), comm.timeout, "low_latency_dispatch: token exchange")
    hook = event.current_stream_wait if return_recv_hook else (lambda: None)
    if not async_finish and not return_recv_hook:
        event.current_stream_wait()

    handle = _LazyHandle(src_info, layout_range, num_max, H, num_experts, pairs, event)
    out = (recv_data, recv_scales) if use_fp8 else recv_data
    return out, recv_count, handle, event, hook


class _LazyHandle:
    """Builds the `LowLatencyHandle` once the receive has completed (the pairs are known only then)."""

    def __init__(self, src_info, layout_range, num_max, hidden, num_experts, pairs, event):
        self._args = (src_info, layout_range, num_max, hidden, num_experts)
        self._pairs = pairs
        self._event = event

    def resolve(self) -> LowLatencyHandle:
        self._event.current_stream_wait()
        p = self._pairs
        return LowLatencyHandle(*self._args, p["expert"], p["pos"], p["splits"])

    def __getitem__(self, i):
        return self.resolve()[i]

    def __iter__(self):
        return iter(self.resolve())

    def __len__(self) -> int:
        return len(LowLatencyHandle._fields)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)


def resolve_handle(handle) -> LowLatencyHandle:
    if isinstance(handle, _LazyHandle):
        return handle.resolve()
    if isinstance(handle, LowLatencyHandle):
        return handle
    raise ValueError("handle must come from low_latency_dispatch")


def combine(comm, x, topk_idx, topk_weights, handle, async_finish: bool, return_recv_hook: bool, out):
    """See `Buffer.low_latency_combine`: `out[t] = Σ_k w[t,k] · y(t,k)` in fp32, k ascending, then bf16."""
    h = resolve_handle(handle)
    R = comm.group_size
    El = h.num_experts // R
    slots = R * h.num_max_dispatch_tokens_per_rank
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (El, slots, h.hidden) or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bf16 [{El}, {slots}, {h.hidden}]")
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError("topk_idx must be [num_tokens, num_topk]")
    T, K = topk_idx.shape
    _check_common(comm, topk_idx, h.num_max_dispatch_tokens_per_rank, h.num_experts, T)
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must be [{T}, {K}]")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if out is not None and (tuple(out.shape) != (T, h.hidden) or out.dtype != torch.bfloat16):
        raise ValueError(f"out must be bf16 [{T}, {h.hidden}]")

    send = x[h.slot_expert, h.slot_pos]  # (source rank, token, k) order
    idx = topk_idx.long()
    tk = (idx >= 0).nonzero()  # (token, k), token-major
    dest = idx[tk[:, 0], tk[:, 1]] // El
    order = torch.sort(dest, stable=True).indices  # (dest rank, token, k)
    tk = tk[order]
    recv_splits = torch.bincount(dest, minlength=R).tolist()
    recv = torch.empty(tk.shape[0], h.hidden, dtype=torch.bfloat16)
    work = start_all_to_all(
        comm.group,
        recv.view(torch.uint8),
        send.view(torch.uint8),
        recv_splits,
        list(h.back_splits),
        "low_latency_combine: token exchange",
    )
    combined = out if out is not None else torch.empty(T, h.hidden, dtype=torch.bfloat16)

    def finish() -> None:
        acc = torch.zeros(T, h.hidden, dtype=torch.float32)
        vals = recv.float()
        w = topk_weights[tk[:, 0], tk[:, 1]]
        for k in range(K):  # each token appears at most once per k, so every index_add_ is a single add
            sel = (tk[:, 1] == k).nonzero().squeeze(1)
            acc.index_add_(0, tk[sel, 0], vals[sel] * w[sel, None])
        combined.copy_(acc)

    event = EventOverlap([work], finish, (send, recv), comm.timeout, "low_latency_combine: token exchange")
    hook = event.current_stream_wait if return_recv_hook else (lambda: None)
    if not async_finish and not return_recv_hook:
        event.current_stream_wait()
    return combined, event, hook
