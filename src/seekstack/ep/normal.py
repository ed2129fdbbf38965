"""Normal (high-throughput) dispatch and combine: DeepEP's intranode/internode kernels as row exchanges.

`dispatch` and `combine` validate their arguments and pick the wire: shared-memory windows when the Buffer has them
(`intranode`, ranks on one host), otherwise a row exchange over torch.distributed, described here. Dispatch: every
rank all-gathers a small int64 header (its row width and its token counts per rank and per expert) so each rank
knows what it will receive; the hidden states then move straight from a gathered staging copy into `recv_x`, and
the small per-token fields (fp8 scales, local top-k ids, weights, source index) move as one packed int32 row. A
token travels once to each rank that holds any of its experts; rows arrive grouped by source rank, in source order.
Combine sends each source rank its slice of the expert outputs and sums every token's copies in fp32, lowest rank
first, which makes the result deterministic and bit-identical to a plain all_to_all_single reference. Everything
runs on the tensors' device (CPU with gloo, CUDA with NCCL).
"""

from __future__ import annotations

import torch

from . import intranode
from .events import EventOverlap, wait_work
from .reduce import sum_bags, sum_copies
from .routing import (
    MAGIC,
    OP_DISPATCH,
    DispatchHandle,
    Fields,
    alloc_received,
    check_device,
    dispatch_result,
    fill_token_fields,
    make_handle,
    plan_receive,
    split_x,
    unpack_token_fields,
)
from .transport import post_exchange, split_offsets, start_all_to_all, wait_all, wire

__all__ = ["DispatchHandle", "combine", "dispatch"]


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
    num_tokens = data.shape[0]
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
    fields = Fields(
        0 if scales is None else scales.shape[1],
        0 if topk_idx is None else topk_idx.shape[1],
        topk_weights is not None,
        num_experts,
    )
    row_bytes = data_w.shape[1] * data_w.element_size() + 4 * fields.cols
    consts = [MAGIC, OP_DISPATCH, row_bytes, num_worst_tokens, expert_alignment, num_experts]
    header = torch.cat(
        [torch.tensor(consts, device=dev), send_counts, num_tokens_per_expert.to(device=dev, dtype=torch.int64)]
    )
    # Rows to send, grouped by destination rank and in token order within a rank.
    send_order = is_token_in_rank.t().nonzero()[:, 1].contiguous()
    send_splits = send_counts.tolist()
    windows = comm.shared_windows(dev)
    if windows is not None:
        return intranode.dispatch(
            comm, windows, data_w, data, scales, topk_idx, topk_weights, is_token_in_rank, header, send_order,
            send_splits, fields, async_finish,
        )  # fmt: skip

    # The count exchange is a round trip on the critical path: the send side's packing, which needs no counts
    # from the peers, runs while it is in flight.
    header_send = header.repeat(R)
    header_recv = torch.empty_like(header_send)
    hstep = "dispatch: count exchange"
    hwork = start_all_to_all(comm.group, header_recv, header_send, None, None, hstep)

    send_off = split_offsets(send_splits)
    stage = comm.take_scratch("dispatch_x", (send_off[-1], data_w.shape[1]), data_w.dtype, dev)
    gather_x = _gatherer(data_w, send_order, stage)
    if not comm.p2p:  # one all_to_all of every row: gather them while the counts travel (GPU work overlaps)
        gather_x = gather_x(0, send_off[-1])
    meta = _pack_meta(comm, send_order, num_tokens, scales, topk_idx, topk_weights, fields.cols)

    wait_work(hwork, comm.timeout, hstep)
    plan = plan_receive(header_recv.view(R, -1), rank, hstep)
    recv_splits, num_recv = plan.recv_splits, plan.num_recv
    out = alloc_received(comm, data, scales, fields, num_worst_tokens or num_recv, num_recv)
    recv_x_w = wire(out.recv_x)[:num_recv]
    meta_recv = comm.take_scratch("dispatch_meta_recv", (num_recv, fields.cols), torch.int32, dev)
    step = "dispatch: token exchange"
    works = post_exchange(comm, [(gather_x, recv_x_w), (meta, meta_recv)], send_splits, recv_splits, step)
    if comm.p2p:  # this rank's own rows skip the wire: gathered straight into recv_x while peers' rows travel
        a, b, c = send_off[rank], send_off[rank + 1], split_offsets(recv_splits)[rank]
        torch.index_select(data_w, 0, send_order[a:b], out=recv_x_w[c : c + b - a])
        meta_recv[c : c + b - a].copy_(meta[a:b])

    def finish() -> None:
        wait_all(works, comm.timeout, step)
        comm.give_scratch("dispatch_x", stage)
        comm.give_scratch("dispatch_meta", meta)
        unpack_token_fields(comm, meta_recv, out, fields)
        comm.give_scratch("dispatch_meta_recv", meta_recv)

    event = EventOverlap([], finish, (data, scales), comm.timeout, step)
    handle = make_handle(plan, send_order, out, is_token_in_rank, send_splits, num_tokens, num_worst_tokens)
    return dispatch_result(out, handle, event, async_finish)


def _pack_meta(comm, order, num_tokens: int, scales, topk_idx, topk_weights, cols: int) -> torch.Tensor:
    """The int32 rows of the tokens `order` (see `routing`): built per token, then gathered with one
    `index_select` (elementwise masking on `[N, K]` costs ~0.1 ms per op on CPU: a masked_fill alone took 135 µs
    for 4k x 8; the receiver maps ids with one table lookup instead)."""
    table = comm.take_scratch("dispatch_meta_tokens", (num_tokens, cols), torch.int32, order.device)
    fill_token_fields(table, scales, topk_idx, topk_weights)
    meta = comm.take_scratch("dispatch_meta", (order.shape[0], cols), torch.int32, order.device)
    torch.index_select(table, 0, order, out=meta)
    comm.give_scratch("dispatch_meta_tokens", table)
    return meta


def _gatherer(src: torch.Tensor, order: torch.Tensor, stage: torch.Tensor):
    """`rows(a, b)`: gathers `src[order[a:b]]` into `stage[a:b]` and returns it (see `post_exchange`)."""

    def rows(a: int, b: int) -> torch.Tensor:
        return torch.index_select(src, 0, order[a:b], out=stage[a:b])

    return rows


def _cached_dispatch(comm, data, scales, handle: DispatchHandle, async_finish: bool):
    """Dispatch along a previous call's routing: no count exchange, no top-k, only the rows."""
    if not isinstance(handle, DispatchHandle):
        raise ValueError("handle must come from a previous dispatch")
    if data.shape[0] != handle.num_tokens:
        raise ValueError(f"x has {data.shape[0]} tokens, the handle was made for {handle.num_tokens}")
    check_device(data.device, handle=handle.send_order)
    num_recv, rank = handle.num_recv_tokens, comm.rank
    out = alloc_received(comm, data, scales, Fields(0, 0, False, 0), handle.num_worst_tokens or num_recv, num_recv)
    recv_x, recv_scales = out.recv_x, out.recv_scales
    windows = comm.shared_windows(data.device)
    if windows is not None:
        return intranode.cached_dispatch(comm, windows, data, scales, handle, out, async_finish)
    send_splits, recv_splits = list(handle.send_splits), list(handle.recv_splits)
    send_off, recv_off = split_offsets(send_splits), split_offsets(recv_splits)
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
    combined = comm.take_output("combined", (handle.num_tokens, hidden), x.dtype, dev)
    combined_w = None
    if topk_weights is not None:
        combined_w = torch.empty(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32, device=dev)
    windows = comm.shared_windows(dev)
    if windows is not None:
        return intranode.combine(comm, windows, fields, handle, biases, combined, combined_w, async_finish)
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

    def finish() -> None:
        rows = staged[0]
        a, b, c = back_off[rank], back_off[rank + 1], x_off[rank]
        if comm.p2p and topk_weights is not None:  # this rank's own rows never left x: they are read from there
            staged[1][a:b].copy_(fields[1][c : c + b - a])
        wait_all(works, comm.timeout, step)

        blocks = [rows[back_off[j] : back_off[j + 1]] for j in range(len(back_off) - 1)]
        if comm.p2p:
            blocks[rank] = fields[0][c : c + b - a]
        perm, offsets = sum_copies(comm, handle, combined, blocks, biases)
        if combined_w is not None:
            combined_w.copy_(sum_bags(staged[1], perm, offsets))
        for n, st in zip(names, staged, strict=False):
            comm.give_scratch(n, st)

    event = EventOverlap([], finish, tuple(fields), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    return combined, combined_w, event
