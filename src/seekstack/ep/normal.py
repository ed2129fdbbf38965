"""Normal (high-throughput) dispatch and combine: DeepEP's intranode/internode kernels as row exchanges.

Dispatch: every rank all-gathers a small int64 header (its row width and its token counts per rank and per expert)
so each rank knows what it will receive; the hidden states then move straight from a gathered staging copy into
`recv_x`, and the small per-token fields (fp8 scales, local top-k ids, weights, source index) move as one packed
int32 row. A token travels once to each rank that holds any of its experts; rows arrive grouped by source rank,
in source order. Combine sends each source rank its slice of the expert outputs and sums every token's copies in
fp32, lowest rank first, which makes the result deterministic and bit-identical to a plain all_to_all_single
reference. Everything runs on the tensors' device (CPU with gloo, CUDA with NCCL).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .events import EPCommError, EventOverlap, wait_work
from .reduce import block_starts, reduce_tiles, sum_bags, tile_bounds
from .transport import post_exchange, split_offsets, start_all_to_all, wait_all, wire

_MAGIC = 0x45505F31  # "EP_1": a peer that sends anything else is not in the same call
_OP_DISPATCH = 1
_HEADER = 6  # magic, op, row_bytes, num_worst_tokens, expert_alignment, num_experts


class DispatchHandle(NamedTuple):
    """What combine and a cached dispatch need; field 0 is DeepEP's `rank_prefix_matrix`.

    `rank_prefix_matrix[i][j]` is the number of tokens ranks 0..i send to rank j, so on rank j the rows received
    from rank i are `recv_x[prefix[i-1][j]:prefix[i][j]]`.
    """

    rank_prefix_matrix: torch.Tensor  # [R, R] int32
    send_order: torch.Tensor  # [N_send] int64: source token of each sent row, grouped by destination rank
    recv_src_idx: torch.Tensor  # [N_recv] int32: token index at its source rank
    is_token_in_rank: torch.Tensor  # [T, R] bool
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    num_tokens: int
    num_recv_tokens: int
    num_worst_tokens: int
    num_recv_tokens_per_expert_list: tuple[int, ...]


def split_x(x, name: str = "x") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`x` or `(x_fp8, scales)` → `(data [T, H], scales [T, S] | None)`, validated."""
    if isinstance(x, tuple | list):
        if len(x) != 2:
            raise ValueError(f"{name} must be a tensor or a (fp8 data, scales) pair")
        data, scales = x
        if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.element_size() != 1:
            raise ValueError(f"{name}[0] must be a 2-D fp8 (1-byte) tensor [num_tokens, hidden]")
        if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.shape[0] != data.shape[0]:
            raise ValueError(f"{name}[1] (scales) must be 2-D [num_tokens, hidden/128]")
        if scales.dtype not in (torch.float32, torch.int32):
            raise ValueError(f"{name}[1] (scales) must be float32 (or int32 packed UE8M0), got {scales.dtype}")
        if scales.device != data.device:
            raise ValueError(f"{name}[1] (scales) must be on {data.device}, got {scales.device}")
        return data, scales
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_tokens, hidden] tensor or a (fp8, scales) pair")
    return x, None


def check_device(device: torch.device, **tensors) -> None:
    """Every given tensor must live on `device` (the device of x): ValueError naming the first that does not."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")


def _pad(count: int, alignment: int) -> int:
    return (count + alignment - 1) // alignment * alignment


def dispatch(
    comm,
    x,
    handle: DispatchHandle | None,
    num_tokens_per_rank: torch.Tensor | None,
    is_token_in_rank: torch.Tensor | None,
    num_tokens_per_expert: torch.Tensor | None,
    topk_idx: torch.Tensor | None,
    topk_weights: torch.Tensor | None,
    expert_alignment: int,
    num_worst_tokens: int,
    async_finish: bool,
):
    """See `Buffer.dispatch`; `comm` supplies `group`, `rank`, `group_size`, `timeout`, `p2p` and scratch memory."""
    data, scales = split_x(x)
    num_tokens, hidden = data.shape
    R, rank, dev = comm.group_size, comm.rank, data.device
    if expert_alignment < 1:
        raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
    if num_worst_tokens < 0:
        raise ValueError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")

    if handle is not None:
        return _cached_dispatch(comm, data, scales, handle, async_finish)

    if not isinstance(is_token_in_rank, torch.Tensor) or is_token_in_rank.dtype != torch.bool:
        raise ValueError("is_token_in_rank must be a bool tensor (from get_dispatch_layout)")
    if tuple(is_token_in_rank.shape) != (num_tokens, R):
        raise ValueError(f"is_token_in_rank must be [{num_tokens}, {R}], got {list(is_token_in_rank.shape)}")
    if not isinstance(num_tokens_per_rank, torch.Tensor) or tuple(num_tokens_per_rank.shape) != (R,):
        raise ValueError(f"num_tokens_per_rank must be a [{R}] tensor")
    if not isinstance(num_tokens_per_expert, torch.Tensor) or num_tokens_per_expert.dim() != 1:
        raise ValueError("num_tokens_per_expert must be a 1-D [num_experts] tensor")
    check_device(
        dev,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
    )
    num_experts = num_tokens_per_expert.numel()
    if num_experts == 0 or num_experts % R:
        raise ValueError(f"num_tokens_per_expert length ({num_experts}) must be a positive multiple of {R} ranks")
    experts_per_rank = num_experts // R
    send_counts = is_token_in_rank.sum(0, dtype=torch.int64)
    if not torch.equal(send_counts, num_tokens_per_rank.to(torch.int64)):
        raise ValueError("num_tokens_per_rank does not match is_token_in_rank.sum(0)")
    if topk_idx is not None:
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2 or topk_idx.shape[0] != num_tokens:
            raise ValueError(f"topk_idx must be [{num_tokens}, num_topk]")
        if topk_idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"topk_idx must be int64, got {topk_idx.dtype}")
        if topk_idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(topk_idx))
            if lo < -1 or hi >= num_experts:
                raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got [{lo}, {hi}]")
    if topk_weights is not None:
        if topk_idx is None:
            raise ValueError("topk_weights needs topk_idx")
        if topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32 {list(topk_idx.shape)}")

    data_w = wire(data.contiguous())
    num_s = 0 if scales is None else scales.shape[1]
    num_topk = 0 if topk_idx is None else topk_idx.shape[1]
    # Packed per-token int32 row: scales, top-k expert ids + 1, weights (as bits), source index.
    meta_cols = num_s + num_topk + (num_topk if topk_weights is not None else 0) + 1
    row_bytes = data_w.shape[1] * data_w.element_size() + 4 * meta_cols
    consts = [_MAGIC, _OP_DISPATCH, row_bytes, num_worst_tokens, expert_alignment, num_experts]
    header = torch.cat(
        [torch.tensor(consts, device=dev), send_counts, num_tokens_per_expert.to(device=dev, dtype=torch.int64)]
    )
    # The count exchange is a round trip on the critical path: the send side's packing, which needs no counts
    # from the peers, runs while it is in flight.
    header_send = header.repeat(R)
    header_recv = torch.empty_like(header_send)
    hstep = "dispatch: count exchange"
    hwork = start_all_to_all(comm.group, header_recv, header_send, None, None, hstep)

    # Rows to send, grouped by destination rank and in token order within a rank.
    dest_tok = is_token_in_rank.t().nonzero()
    send_order = dest_tok[:, 1].contiguous()
    send_splits = send_counts.tolist()
    send_off = split_offsets(send_splits)
    stage = comm.take_scratch("dispatch_x", (send_off[-1], data_w.shape[1]), data_w.dtype, dev)
    gather_x = _gatherer(data_w, send_order, stage)
    if not comm.p2p:  # one all_to_all of every row: gather them while the counts travel (GPU work overlaps)
        gather_x = gather_x(0, send_off[-1])
    meta = _pack_meta(comm, send_order, num_tokens, scales, topk_idx, topk_weights, meta_cols)

    wait_work(hwork, comm.timeout, hstep)
    headers = header_recv.view(R, -1)
    rows = headers.tolist()  # the one host round trip of a normal dispatch (DeepEP has it too)
    _check_headers(rows)
    recv_splits = [rows[i][_HEADER + rank] for i in range(R)]
    num_recv = sum(recv_splits)
    # Checked for every rank on every rank, so all of them raise together rather than leaving peers waiting.
    for i in range(R):
        worst, total = rows[i][3], sum(rows[j][_HEADER + i] for j in range(R))
        if worst and total > worst:
            raise ValueError(f"num_worst_tokens ({worst}) of rank {i} is smaller than the {total} tokens it receives")
    base = _HEADER + R + rank * experts_per_rank
    per_expert_list = tuple(
        _pad(sum(rows[i][base + e] for i in range(R)), expert_alignment) for e in range(experts_per_rank)
    )
    rank_prefix_matrix = headers[:, _HEADER : _HEADER + R].cumsum(0).to(torch.int32)

    out_rows = num_worst_tokens or num_recv
    recv_x, recv_scales = _alloc_recv(comm, data, scales, out_rows, num_recv)
    recv_x_w = wire(recv_x)[:num_recv]
    meta_recv = comm.take_scratch("dispatch_meta_recv", (num_recv, meta_cols), torch.int32, dev)
    step = "dispatch: token exchange"
    works = post_exchange(comm, [(gather_x, recv_x_w), (meta, meta_recv)], send_splits, recv_splits, step)
    if comm.p2p:  # this rank's own rows skip the wire: gathered straight into recv_x while peers' rows travel
        a, b, c = send_off[rank], send_off[rank + 1], split_offsets(recv_splits)[rank]
        torch.index_select(data_w, 0, send_order[a:b], out=recv_x_w[c : c + b - a])
        meta_recv[c : c + b - a].copy_(meta[a:b])
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        recv_topk_idx = torch.empty((out_rows, num_topk), dtype=torch.int64, device=dev)
        recv_topk_idx[num_recv:] = -1
    if topk_weights is not None:
        recv_topk_weights = torch.empty((out_rows, num_topk), dtype=torch.float32, device=dev)
        recv_topk_weights[num_recv:] = 0.0
    recv_src_idx = torch.empty(num_recv, dtype=torch.int32, device=dev)

    def finish() -> None:
        wait_all(works, comm.timeout, step)
        comm.give_scratch("dispatch_x", stage)
        comm.give_scratch("dispatch_meta", meta)
        col = 0
        if recv_scales is not None:
            recv_scales[:num_recv].view(torch.int32).copy_(meta_recv[:, :num_s])
            col = num_s
        if recv_topk_idx is not None:
            # Global ids + 1 → this rank's local ids, -1 for experts elsewhere: one table lookup, no masks.
            ids = meta_recv[:, col : col + num_topk].reshape(-1)
            local = local_expert_table(comm, num_experts, dev).index_select(0, ids).view(num_recv, num_topk)
            recv_topk_idx[:num_recv].copy_(local)
            col += num_topk
            if recv_topk_weights is not None:
                # Weights of experts elsewhere become +0.0 (as `where(mine, w, 0)`): their bits AND 0.
                keep = (local >> 31).bitwise_not_()
                w_bits = recv_topk_weights[:num_recv].view(torch.int32)
                torch.bitwise_and(meta_recv[:, col : col + num_topk], keep, out=w_bits)
                col += num_topk
        recv_src_idx.copy_(meta_recv[:, col])
        comm.give_scratch("dispatch_meta_recv", meta_recv)

    handle = DispatchHandle(
        rank_prefix_matrix,
        send_order,
        recv_src_idx,
        is_token_in_rank,
        tuple(send_splits),
        tuple(recv_splits),
        num_tokens,
        num_recv,
        num_worst_tokens,
        per_expert_list,
    )
    event = EventOverlap([], finish, (data, scales), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
    expert_list = [] if num_worst_tokens else list(per_expert_list)
    return out_x, recv_topk_idx, recv_topk_weights, expert_list, handle, event


def _pack_meta(comm, order, num_tokens: int, scales, topk_idx, topk_weights, cols: int) -> torch.Tensor:
    """The int32 rows `[scales | expert ids + 1 | weight bits | source index]` of the tokens `order`.

    Built per token, then gathered with one `index_select`: elementwise masking on `[N, K]` costs ~0.1 ms per op
    on CPU (a masked_fill alone took 135 µs for 4k x 8), and the receiver maps ids with one table lookup instead.
    """
    dev = order.device
    table = comm.take_scratch("dispatch_meta_tokens", (num_tokens, cols), torch.int32, dev)
    col = 0
    if scales is not None:
        col = scales.shape[1]
        table[:, :col].copy_(scales.view(torch.int32))
    if topk_idx is not None:
        k = topk_idx.shape[1]
        torch.add(topk_idx, 1, out=table[:, col : col + k])  # -1 ("no expert") → 0, the table's "elsewhere"
        col += k
        if topk_weights is not None:
            table[:, col : col + k].copy_(topk_weights.view(torch.int32))
            col += k
    table[:, col].copy_(torch.arange(num_tokens, dtype=torch.int32, device=dev))
    meta = comm.take_scratch("dispatch_meta", (order.shape[0], cols), torch.int32, dev)
    torch.index_select(table, 0, order, out=meta)
    comm.give_scratch("dispatch_meta_tokens", table)
    return meta


def local_expert_table(comm, num_experts: int, dev) -> torch.Tensor:
    """int32 `[E + 1]`: entry `g + 1` is expert g's local id on this rank, or -1 (entry 0: no expert)."""
    key = ("local_experts", num_experts, str(dev))
    table = comm.constants.get(key)
    if table is None:
        per_rank = num_experts // comm.group_size
        table = torch.full((num_experts + 1,), -1, dtype=torch.int32, device=dev)
        lo = 1 + comm.rank * per_rank
        table[lo : lo + per_rank] = torch.arange(per_rank, dtype=torch.int32, device=dev)
        comm.constants[key] = table
    return table


def _gatherer(src: torch.Tensor, order: torch.Tensor, stage: torch.Tensor):
    """`rows(a, b)`: gathers `src[order[a:b]]` into `stage[a:b]` and returns it (see `post_exchange`)."""

    def rows(a: int, b: int) -> torch.Tensor:
        return torch.index_select(src, 0, order[a:b], out=stage[a:b])

    return rows


def _alloc_recv(comm, data, scales, out_rows: int, num_recv: int):
    """Outputs for received rows; only the `num_worst_tokens` padding is zeroed (the rest is overwritten)."""
    recv_x = comm.take_output("recv_x", (out_rows, data.shape[1]), data.dtype, data.device)
    recv_x[num_recv:].zero_()
    recv_scales = None
    if scales is not None:
        recv_scales = comm.take_output("recv_scales", (out_rows, scales.shape[1]), scales.dtype, data.device)
        recv_scales[num_recv:].zero_()
    return recv_x, recv_scales


def _check_headers(rows: list[list[int]]) -> None:
    """Every rank must be in the same call with the same row layout; otherwise all ranks raise the same error."""
    names = {0: "magic", 1: "operation", 2: "row bytes", 5: "num_experts"}
    for i, row in enumerate(rows):
        for k, name in names.items():
            if row[k] != rows[0][k]:
                raise EPCommError(
                    f"dispatch: count exchange: rank {i} disagrees with rank 0 on {name} "
                    f"({row[k]} vs {rows[0][k]}); every rank must make the same call"
                )


def _cached_dispatch(comm, data, scales, handle: DispatchHandle, async_finish: bool):
    """Dispatch along a previous call's routing: no count exchange, no top-k, only the rows."""
    if not isinstance(handle, DispatchHandle):
        raise ValueError("handle must come from a previous dispatch")
    if data.shape[0] != handle.num_tokens:
        raise ValueError(f"x has {data.shape[0]} tokens, the handle was made for {handle.num_tokens}")
    check_device(data.device, handle=handle.send_order)
    num_recv, rank = handle.num_recv_tokens, comm.rank
    send_splits, recv_splits = list(handle.send_splits), list(handle.recv_splits)
    send_off, recv_off = split_offsets(send_splits), split_offsets(recv_splits)
    recv_x, recv_scales = _alloc_recv(comm, data, scales, handle.num_worst_tokens or num_recv, num_recv)
    srcs = [wire(data.contiguous())] + ([scales.view(torch.int32)] if scales is not None else [])
    outs = [wire(recv_x)[:num_recv]] + ([recv_scales[:num_recv].view(torch.int32)] if scales is not None else [])
    stages = [
        comm.take_scratch(f"dispatch_cached{i}", (send_off[-1], src.shape[1]), src.dtype, data.device)
        for i, src in enumerate(srcs)
    ]
    gathers = [_gatherer(src, handle.send_order, stage) for src, stage in zip(srcs, stages, strict=True)]
    step = "cached dispatch: token exchange"
    works = post_exchange(comm, list(zip(gathers, outs, strict=True)), send_splits, recv_splits, step)
    if comm.p2p:
        a, b, c = send_off[rank], send_off[rank + 1], recv_off[rank]
        for src, out in zip(srcs, outs, strict=True):
            torch.index_select(src, 0, handle.send_order[a:b], out=out[c : c + b - a])

    def finish() -> None:
        wait_all(works, comm.timeout, step)
        for i, stage in enumerate(stages):
            comm.give_scratch(f"dispatch_cached{i}", stage)

    event = EventOverlap([], finish, (data, scales), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
    return out_x, None, None, None, None, event


def combine_index(handle: DispatchHandle) -> tuple[torch.Tensor, torch.Tensor]:
    """`(perm, offsets)`: the returned rows of each token, lowest rank first, as `embedding_bag` bags.

    Returned rows are grouped by rank and in token order within a rank (`send_order`), so a stable sort by token
    lists each token's copies in rank order; `offsets[t]` is where token t's copies start.
    """
    perm = torch.sort(handle.send_order, stable=True).indices
    counts = handle.is_token_in_rank.sum(1)
    return perm, counts.cumsum(0) - counts


def combine(comm, x: torch.Tensor, handle: DispatchHandle, topk_weights, bias, async_finish: bool):
    """See `Buffer.combine`: unweighted fp32 sum of each token's copies, in rank order, then the biases."""
    if not isinstance(handle, DispatchHandle):
        raise ValueError("handle must come from dispatch")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point() or x.element_size() < 2:
        raise ValueError("x must be a 2-D bf16/fp16/fp32 tensor [num_recv_tokens, hidden]")
    num_recv = handle.num_recv_tokens
    if x.shape[0] not in (num_recv, handle.num_worst_tokens):
        raise ValueError(f"x must have {num_recv} rows (the dispatched tokens), got {x.shape[0]}")
    dev, hidden = x.device, x.shape[1]
    check_device(dev, handle=handle.send_order, topk_weights=topk_weights)
    fields = [x[:num_recv].contiguous()]
    if topk_weights is not None:
        if topk_weights.dim() != 2 or topk_weights.shape[0] != x.shape[0] or topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32 [{x.shape[0]}, num_topk]")
        fields.append(topk_weights[:num_recv].contiguous())
    if bias is None or isinstance(bias, torch.Tensor):
        biases = () if bias is None else (bias,)
    else:
        biases = tuple(b for b in bias if b is not None)
    if len(biases) > 2:
        raise ValueError("bias takes at most two tensors")
    for b in biases:
        if tuple(b.shape) != (handle.num_tokens, hidden):
            raise ValueError(f"bias must be [{handle.num_tokens}, {hidden}], got {list(b.shape)}")
        check_device(dev, bias=b)
    rank = comm.rank
    step = "combine: token exchange"
    # Rows come back along the reversed dispatch splits. Rows received by dispatch are grouped by source rank, so
    # each peer's rows are one contiguous slice of x: they are sent as they are, with no packing.
    back_splits, x_splits = list(handle.send_splits), list(handle.recv_splits)
    back_off, x_off = split_offsets(back_splits), split_offsets(x_splits)
    n_back = back_off[-1]
    names = ("combine_rows", "combine_w")
    staged = [comm.take_scratch(n, (n_back, f.shape[1]), f.dtype, dev) for n, f in zip(names, fields, strict=False)]
    works = post_exchange(comm, list(zip(fields, staged, strict=True)), x_splits, back_splits, step)
    combined = comm.take_output("combined", (handle.num_tokens, hidden), x.dtype, dev)
    combined_w = None
    if topk_weights is not None:
        combined_w = torch.empty(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32, device=dev)

    def finish() -> None:
        rows = staged[0]
        a, b, c = back_off[rank], back_off[rank + 1], x_off[rank]
        if comm.p2p and topk_weights is not None:  # this rank's own rows never left x: they are read from there
            staged[1][a:b].copy_(fields[1][c : c + b - a])
        wait_all(works, comm.timeout, step)

        def widen(dst: torch.Tensor, s: int, e: int) -> None:
            dst.copy_(fields[0][c + s - a : c + e - a] if comm.p2p and a <= s < b else rows[s:e])

        def scratch(n: int) -> torch.Tensor:
            return comm.take_scratch("combine_f32", (n, hidden), torch.float32, dev)

        perm, offsets = combine_index(handle)
        bounds = tile_bounds(handle.num_tokens, back_off[-1], hidden, dev)
        starts = block_starts(lambda: handle.is_token_in_rank, bounds, back_off)
        wide = reduce_tiles(combined, widen, perm, offsets, bounds, starts, scratch, biases)
        if combined_w is not None:
            combined_w.copy_(sum_bags(staged[1], perm, offsets))
        for n, st in zip(names, staged, strict=False):
            comm.give_scratch(n, st)
        comm.give_scratch("combine_f32", wide)

    event = EventOverlap([], finish, tuple(fields), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    return combined, combined_w, event
