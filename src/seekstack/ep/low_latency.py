"""Low-latency dispatch and combine into DeepEP's masked layout `[E_local, R * max_tokens, H]`.

Dispatch is CPU-sync-free on the send side: each rank sends every peer a fixed block of
`num_max_dispatch_tokens_per_rank` int32 rows `[data | scales | expert ids + 1 | tag]` (one row per token that has any
expert there, padding rows after), so one even `all_to_all_single` needs no count exchange. The receiver copies
each row into one slot per (token, local expert), ordered by source rank, token and top-k position, which is what
a masked grouped GEMM consumes (`recv_count[e]` valid rows per expert). Combine sends each slot's expert output
back (both sides know the split sizes from the routing) and the source rank adds them weighted by `topk_weights`,
in fp32, in top-k order. Everything runs on the tensors' device.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch

from .events import EPCommError, EventOverlap
from .fp8 import pack_ue8m0, per_token_cast_to_fp8
from .fused_sum import fused_weighted_sum
from .reduce import block_starts, reduce_tiles, tile_bounds
from .routing import HEADER, MAGIC, OP_LL_COMBINE, OP_LL_DISPATCH, check_device, local_expert_table
from .shared import read_headers, sections, view
from .transport import split_offsets, start_all_to_all

_LL_HEADER = HEADER + 1  # the six constants (num_max in the num_worst_tokens slot), then the rank's token count


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
    send_rows: torch.Tensor  # [P] int64: row e*R*max + i of each received (token, k) pair, in (src, token, k) order
    back_splits: tuple[int, ...]  # pairs per source rank (combine send splits)


def _check_common(comm, topk_idx, num_max, num_experts, num_tokens):
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx must be [{num_tokens}, num_topk]")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_idx must be int64, got {topk_idx.dtype}")
    if num_experts <= 0 or num_experts % comm.group_size:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of {comm.group_size} ranks")
    if topk_idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(topk_idx))
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got [{lo}, {hi}]")
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
    dev = x.device
    check_device(dev, topk_idx=topk_idx, cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats)
    _check_common(comm, topk_idx, num_max, num_experts, T)
    if use_fp8 and H % 128:
        raise ValueError(f"hidden ({H}) must be a multiple of 128 for use_fp8")
    if not use_fp8 and H % 2:
        raise ValueError(f"hidden ({H}) must be even")
    if use_ue8m0 and not (use_fp8 and round_scale):
        raise ValueError("use_ue8m0 needs use_fp8=True and round_scale=True")
    if use_ue8m0 and H % 512:
        raise ValueError(f"use_ue8m0 packs four scales per int32: hidden ({H}) must be a multiple of 512")
    R = comm.group_size
    El = num_experts // R
    K = topk_idx.shape[1]
    slots = R * num_max

    # One int32 row per token plus an all-zero padding row (no expert, tag 0) that every unused slot copies.
    x = x.contiguous()
    if use_fp8:
        q, scales = per_token_cast_to_fp8(x, round_scale)
        payload, S = q.view(torch.int32), H // 128
    else:
        payload, S = x.view(torch.int32), 0
    hw = payload.shape[1]
    c_idx, cols = hw + S, hw + S + K + 1
    windows = comm.shared_windows(dev)
    if windows is not None:  # the rows and each rank's token list go into this rank's window; receivers gather
        windows.begin()
        offs = sections(8 * _LL_HEADER, 4 * (T + 1) * cols, 8 * R * num_max)
        win = windows.own(offs[-1])
        head = [MAGIC, OP_LL_DISPATCH, 4 * cols, num_max, 0, num_experts, T]
        win[: 8 * _LL_HEADER].view(torch.int64).copy_(torch.tensor(head, device="cpu"))
        rows = view(win, offs[1], torch.int32, T + 1, cols)
    else:
        rows = comm.take_scratch("ll_rows", (T + 1, cols), torch.int32, dev)
    rows[:T, :hw].copy_(payload)
    if S:
        rows[:T, hw:c_idx].copy_(scales.view(torch.int32))
    torch.add(topk_idx, 1, out=rows[:T, c_idx : c_idx + K])  # ids + 1: 0 reads as "no expert" in the lookup below
    rows[:T, -1].copy_(torch.arange(1, T + 1, dtype=torch.int32, device=dev))
    rows[T].zero_()

    # Block j of the send buffer: the tokens with an expert on rank j, in order, then padding (row T).
    idx = topk_idx.long()
    dest = torch.where(idx >= 0, idx // El, R)
    in_rank = torch.zeros(T, R + 1, dtype=torch.bool, device=dev).scatter_(1, dest, True)[:, :R]
    tokens = torch.arange(T, device=dev)
    select = torch.full((R, num_max), T, dtype=torch.int64, device=dev)
    select[:, :T] = torch.where(in_rank.t(), tokens, T).sort(dim=1).values
    recv = comm.low_latency_recv_buffer("recv", (slots, cols), torch.int32, dev)
    if windows is not None:
        view(win, offs[2], torch.int64, R, num_max).copy_(select)
        step = "low_latency_dispatch: token exchange (shared memory)"
        works, send = [], rows

        def receive() -> None:  # block j of recv: rank j's rows for this rank, padding rows included
            windows.barrier(comm.timeout, step)
            for j, h in enumerate(read_headers(windows, R, _LL_HEADER, step)):
                if int(h[3]) != num_max:
                    raise EPCommError(f"{step}: rank {j} uses num_max_dispatch_tokens_per_rank {int(h[3])}")
                T_j = int(h[6])
                o = sections(8 * _LL_HEADER, 4 * (T_j + 1) * cols, 8 * R * num_max)
                w = windows.peer(j, o[-1])
                order = view(w, o[2], torch.int64, R, num_max)[comm.rank]
                block = recv[j * num_max : (j + 1) * num_max]
                torch.index_select(view(w, o[1], torch.int32, T_j + 1, cols), 0, order, out=block)

    else:
        send = comm.low_latency_recv_buffer("send", (slots, cols), torch.int32, dev)
        torch.index_select(rows, 0, select.view(-1), out=send)
        comm.give_scratch("ll_rows", rows)
        step = "low_latency_dispatch: token exchange"
        works, receive = [start_all_to_all(comm.group, recv, send, None, None, step)], None

    # The masked layout is large (E_local x R*max x H) and mostly padding, so like DeepEP's two alternating
    # buffers it is reused across calls and not cleared: rows past recv_count[e] hold stale data.
    if use_fp8:
        recv_data = comm.low_latency_recv_buffer("x", (El, slots, H), torch.float8_e4m3fn, dev)
        # Scales are column-major in the last two dims ("for TMA"), as DeepEP returns them.
        s_cols, s_dtype = (S // 4, torch.int32) if use_ue8m0 else (S, torch.float32)
        recv_scales = comm.low_latency_recv_buffer("scales", (El, s_cols, slots), s_dtype, dev).transpose(1, 2)
    else:
        recv_data = comm.low_latency_recv_buffer("x", (El, slots, H), torch.bfloat16, dev)
        recv_scales = None
    recv_count = torch.empty(El, dtype=torch.int32, device=dev)
    src_info = torch.full((El, slots), -1, dtype=torch.int32, device=dev)
    layout_range = torch.empty(El, R, dtype=torch.int64, device=dev)
    pairs: dict[str, object] = {}

    def finish() -> None:
        if receive is not None:
            receive()
        # Expert ids + 1 → local ids or -1 with one lookup (padding rows carry 0: no expert).
        local = local_expert_table(comm, num_experts, dev).index_select(0, recv[:, c_idx : c_idx + K].reshape(-1))
        flat = (local >= 0).nonzero().squeeze(1)  # (row, k) pairs in (source rank, token, k) order
        src_row = flat // K
        expert = local.index_select(0, flat).long()
        counts = torch.bincount(expert, minlength=El)
        # Stable sort by expert keeps (source rank, token, k) order inside each expert.
        sorted_e, by_expert = torch.sort(expert, stable=True)
        pos = torch.arange(flat.numel(), device=dev) - (counts.cumsum(0) - counts)[sorted_e]
        dst = sorted_e * slots + pos  # expert-major slot of each pair
        row_sorted = src_row.index_select(0, by_expert)
        data_flat = recv_data.view(torch.int32).view(El * slots, hw)
        data_flat.index_copy_(0, dst, recv[:, :hw].index_select(0, row_sorted))
        if use_fp8:
            s = recv[:, hw:c_idx].index_select(0, row_sorted).view(torch.float32)
            recv_scales[sorted_e, pos] = pack_ue8m0(s) if use_ue8m0 else s
        src_info.view(-1).index_copy_(0, dst, recv[:, -1].index_select(0, row_sorted) - 1)
        recv_count.copy_(counts)
        src_rank = src_row // num_max
        per_pair = torch.bincount(expert * R + src_rank, minlength=El * R).view(El, R)
        layout_range.copy_(((per_pair.cumsum(1) - per_pair) << 32) | per_pair)
        send_rows = torch.empty_like(dst)
        send_rows[by_expert] = dst
        pairs["send_rows"] = send_rows
        pairs["splits"] = tuple(torch.bincount(src_rank, minlength=R).tolist())
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(recv_count)

    event = EventOverlap(works, finish, (send, recv), comm.timeout, step)
    hook = event.current_stream_wait if return_recv_hook else (lambda: None)
    if not async_finish and not return_recv_hook:
        event.current_stream_wait()
    elif windows is not None:
        comm.defer_shared(event)

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
        return LowLatencyHandle(*self._args, p["send_rows"], p["splits"])

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
    dev = x.device
    check_device(dev, topk_idx=topk_idx, topk_weights=topk_weights, out=out, handle=h.send_rows)
    _check_common(comm, topk_idx, h.num_max_dispatch_tokens_per_rank, h.num_experts, T)
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights must be [{T}, {K}]")
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if out is not None and (tuple(out.shape) != (T, h.hidden) or out.dtype != torch.bfloat16):
        raise ValueError(f"out must be bf16 [{T}, {h.hidden}]")

    # Expert outputs of the received pairs, in (source rank, token, k) order: grouped by the rank they return to.
    P = h.send_rows.numel()
    windows = comm.shared_windows(dev)
    if windows is not None:  # into this rank's window, after a header with the pairs owed to each rank
        windows.begin()
        offs = sections(8 * (HEADER + 1 + R), 2 * P * h.hidden)
        win = windows.own(offs[-1])
        head = [MAGIC, OP_LL_COMBINE, 2 * h.hidden, 0, 0, h.num_experts, P, *h.back_splits]
        win[: 8 * (HEADER + 1 + R)].view(torch.int64).copy_(torch.tensor(head, device="cpu"))
        send = view(win, offs[1], torch.bfloat16, P, h.hidden)
    else:
        send = comm.take_scratch("ll_combine_send", (P, h.hidden), torch.bfloat16, dev)
    torch.index_select(x.reshape(El * slots, h.hidden), 0, h.send_rows, out=send)
    # This rank's own (token, k) pairs, token-major; from rank j they come back in (token, k) order.
    idx = topk_idx.long()
    valid = idx >= 0
    pair = valid.view(-1).nonzero().squeeze(1)
    dest = idx.view(-1).index_select(0, pair) // El
    by_dest = torch.sort(dest, stable=True).indices  # received row i is pair[by_dest[i]]
    recv_splits = torch.bincount(dest, minlength=R).tolist()
    recv_off = split_offsets(recv_splits)
    if windows is not None:
        step = "low_latency_combine: token exchange (shared memory)"
        works, recv = [], None
    else:
        recv = comm.take_scratch("ll_combine_recv", (pair.numel(), h.hidden), torch.bfloat16, dev)
        step = "low_latency_combine: token exchange"
        works = [start_all_to_all(comm.group, recv, send, recv_splits, list(h.back_splits), step)]
    combined = out if out is not None else torch.empty(T, h.hidden, dtype=torch.bfloat16, device=dev)

    def blocks() -> list[torch.Tensor]:
        """The rows each rank j returns, in (token, k) order: a slice of `recv`, or of rank j's window."""
        if windows is None:
            comm.give_scratch("ll_combine_send", send)
            return [recv[recv_off[j] : recv_off[j + 1]] for j in range(R)]
        windows.barrier(comm.timeout, step)
        out_rows = []
        for j, hd in enumerate(read_headers(windows, R, HEADER + 1 + R, step)):
            owed = hd[HEADER + 1 :].tolist()
            if owed[comm.rank] != recv_splits[j]:
                raise EPCommError(f"{step}: rank {j} returns {owed[comm.rank]} rows, {recv_splits[j]} expected")
            o = sections(8 * (HEADER + 1 + R), 2 * int(hd[HEADER]) * h.hidden)
            first = sum(owed[: comm.rank])
            mine = view(windows.peer(j, o[-1]), o[1], torch.bfloat16, first + owed[comm.rank], h.hidden)
            out_rows.append(mine[first:])
        return out_rows

    def finish() -> None:
        rows = blocks()
        bag = torch.empty_like(by_dest)
        bag[by_dest] = torch.arange(by_dest.numel(), device=dev)  # token-major pair → its received row

        def index() -> torch.Tensor:  # [T, K]: the received row of each (token, k) pair, -1 for none
            return torch.full((T * K,), -1, dtype=torch.int64, device=dev).index_copy_(0, pair, bag).view(T, K)

        taken = []

        def joined(n: int) -> torch.Tensor:
            taken.append(comm.take_scratch("ll_combine_joined", (n, h.hidden), torch.bfloat16, dev))
            return taken[-1]

        if fused_weighted_sum(combined, rows, index, topk_weights, joined):
            for t in taken:
                comm.give_scratch("ll_combine_joined", t)
            if recv is not None:
                comm.give_scratch("ll_combine_recv", recv)
            return
        w = topk_weights.reshape(-1).index_select(0, pair.index_select(0, by_dest))  # weight of each received row

        def widen(dst: torch.Tensor, s: int, e: int) -> None:
            # fp32(y) · w, rounded once, as the reference multiplies; widening first and scaling in place takes
            # 0.87 ms where the mixed-dtype torch.mul takes 1.45 ms (1024 x 2048).
            j = bisect.bisect_right(recv_off, s) - 1
            dst.copy_(rows[j][s - recv_off[j] : e - recv_off[j]])
            dst.mul_(w[s:e].unsqueeze(1))

        def scratch(n: int) -> torch.Tensor:
            return comm.take_scratch("ll_combine_f32", (n, h.hidden), torch.float32, dev)

        def per_token_rows() -> torch.Tensor:
            dest_all = torch.where(valid, idx // El, R)
            ones = torch.ones_like(dest_all)
            return torch.zeros(T, R + 1, dtype=torch.int64, device=dev).scatter_add_(1, dest_all, ones)[:, :R]

        counts = valid.sum(1)
        bounds = tile_bounds(T, pair.numel(), h.hidden, dev)
        starts = block_starts(per_token_rows, bounds, recv_off)
        wide = reduce_tiles(combined, widen, bag, counts.cumsum(0) - counts, bounds, starts, scratch)
        if recv is not None:
            comm.give_scratch("ll_combine_recv", recv)
        comm.give_scratch("ll_combine_f32", wide)

    event = EventOverlap(works, finish, (send, x), comm.timeout, step)
    hook = event.current_stream_wait if return_recv_hook else (lambda: None)
    if not async_finish and not return_recv_hook:
        event.current_stream_wait()
    elif windows is not None:
        comm.defer_shared(event)
    return combined, event, hook
