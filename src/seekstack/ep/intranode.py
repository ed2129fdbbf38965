"""Normal dispatch and combine through shared-memory windows (`shared`): DeepEP's intranode path, for CPU ranks on
one host.

Each exchange is *write own window, one barrier, read the peers' windows*:

- dispatch: a rank writes its count header, its tokens' rows (once each, however many ranks want them), their
  per-token int32 fields and the token ids it sends to each rank; after the barrier each rank gathers the rows
  addressed to it straight from the senders' windows into `recv_x`. The header round trip of the socket path
  and its staging copy are gone: a routed row is read once from the sender's window and written once into
  `recv_x`, where a socket copies it user → kernel → user.
- combine: a rank writes the expert outputs it holds for other ranks (already grouped by source rank); after the
  barrier each rank sums its tokens' copies reading the peers' windows directly, with the same fp32 tile
  reduction as the socket path, so the results are bit-identical to it.

Window layouts (byte offsets aligned to 64): dispatch `[int64 header | rows T x row | int32 fields T x cols |
int64 send order]`, cached dispatch `[int64 header | rows | int32 scales]`, combine `[int64 header | rows
num_recv x H | fp32 weights num_recv x K]`. Every header starts with `routing`'s six constants, so ranks in
different calls (or with different row layouts) all raise the same `EPCommError`.
"""

from __future__ import annotations

import torch

from .events import EPCommError, EventOverlap
from .reduce import sum_bags, sum_copies
from .routing import (
    HEADER,
    MAGIC,
    OP_CACHED_DISPATCH,
    OP_COMBINE,
    DispatchHandle,
    Fields,
    Received,
    alloc_received,
    dispatch_result,
    fill_token_fields,
    make_handle,
    plan_receive,
    unpack_token_fields,
)
from .shared import read_headers, sections, view
from .transport import split_offsets

_EXTRA = 3  # dispatch header: num_tokens, data bytes per row, send-order length (after the six constants)


def _finish(comm, finish, keep: tuple, step: str, async_finish: bool) -> EventOverlap:
    """The call's event; an async one is recorded so the next exchange completes it first (see `shared`)."""
    event = EventOverlap([], finish, keep, comm.timeout, step)
    if async_finish:
        comm.defer_shared(event)
    return event


def dispatch(
    comm,
    windows,
    data_w: torch.Tensor,
    data: torch.Tensor,
    scales,
    topk_idx,
    topk_weights,
    is_token_in_rank: torch.Tensor,
    header: torch.Tensor,
    send_order: torch.Tensor,
    send_splits: list[int],
    fields: Fields,
    async_finish: bool,
):
    """`normal.dispatch` over the windows; `header` is the count header of `routing`, `data_w` the wire view."""
    R, rank = comm.group_size, comm.rank
    T, row = data_w.shape[0], data_w.shape[1] * data_w.element_size()
    n_send = send_order.shape[0]
    head = torch.cat([header[:HEADER], torch.tensor([T, row, n_send], device="cpu"), header[HEADER:]])
    length = head.numel()
    offs = sections(8 * length, T * row, 4 * T * fields.cols, 8 * n_send)
    windows.begin()
    win = windows.own(offs[-1])
    win[: 8 * length].view(torch.int64).copy_(head)
    view(win, offs[1], data_w.dtype, T, data_w.shape[1]).copy_(data_w)
    fill_token_fields(view(win, offs[2], torch.int32, T, fields.cols), scales, topk_idx, topk_weights)
    win[offs[3] : offs[3] + 8 * n_send].view(torch.int64).copy_(send_order)

    step = "dispatch: count exchange and token exchange (shared memory)"
    windows.barrier(comm.timeout, step)
    heads = read_headers(windows, R, length, step)
    for j, h in enumerate(heads):
        if int(h[HEADER + 1]) != row:
            raise EPCommError(f"{step}: rank {j} sends rows of {int(h[HEADER + 1])} bytes, this rank {row}")
    table = torch.stack([torch.cat([h[:HEADER], h[HEADER + _EXTRA :]]) for h in heads])
    plan = plan_receive(table, rank, step)
    worst = int(header[3])
    out = alloc_received(comm, data, scales, fields, worst or plan.num_recv, plan.num_recv)
    recv = out.recv_x.view(torch.uint8).view(out.recv_x.shape[0], row)[: plan.num_recv]
    meta_recv = comm.take_scratch("dispatch_meta_recv", (plan.num_recv, fields.cols), torch.int32, data.device)
    # Per source: (tokens, send-order length, where this rank's rows start in its send order).
    sources = [
        (int(h[HEADER]), int(h[HEADER + 2]), int(h[HEADER + _EXTRA : HEADER + _EXTRA + rank].sum())) for h in heads
    ]

    def finish() -> None:
        c = 0
        for j, (T_j, n_j, start) in enumerate(sources):
            n = plan.recv_splits[j]
            if not n:
                continue
            o = sections(8 * length, T_j * row, 4 * T_j * fields.cols, 8 * n_j)
            w = windows.peer(j, o[-1])
            order = w[o[3] + 8 * start : o[3] + 8 * (start + n)].view(torch.int64)
            torch.index_select(view(w, o[1], torch.uint8, T_j, row), 0, order, out=recv[c : c + n])
            torch.index_select(view(w, o[2], torch.int32, T_j, fields.cols), 0, order, out=meta_recv[c : c + n])
            c += n
        unpack_token_fields(comm, meta_recv, out, fields)
        comm.give_scratch("dispatch_meta_recv", meta_recv)

    event = _finish(comm, finish, (data, scales), step, async_finish)
    handle = make_handle(plan, send_order, out, is_token_in_rank, send_splits, T, worst)
    return dispatch_result(out, handle, event, async_finish)


def cached_dispatch(comm, windows, data, scales, handle: DispatchHandle, out: Received, async_finish: bool):
    """`normal`'s cached dispatch over the windows: the rows (and fp8 scales) along the handle's routing."""
    R, T = comm.group_size, data.shape[0]
    row = data.shape[1] * data.element_size()
    S = 0 if scales is None else scales.shape[1]
    offs = sections(8 * (HEADER + 2), T * row, 4 * T * S)
    windows.begin()
    win = windows.own(offs[-1])
    win[: 8 * (HEADER + 2)].view(torch.int64).copy_(
        torch.tensor([MAGIC, OP_CACHED_DISPATCH, row + 4 * S, 0, 0, 0, T, S], device="cpu")
    )
    view(win, offs[1], torch.uint8, T, row).copy_(data.contiguous().view(torch.uint8).view(T, row))
    if S:
        view(win, offs[2], torch.int32, T, S).copy_(scales.view(torch.int32))
    step = "cached dispatch: token exchange (shared memory)"
    windows.barrier(comm.timeout, step)
    heads = read_headers(windows, R, HEADER + 2, step)
    num_recv = handle.num_recv_tokens
    recv = out.recv_x.view(torch.uint8).view(out.recv_x.shape[0], row)[:num_recv]
    recv_off = split_offsets(handle.recv_splits)

    def finish() -> None:
        for j in range(R):
            a, b = recv_off[j], recv_off[j + 1]
            if a == b:
                continue
            T_j = int(heads[j][HEADER])
            o = sections(8 * (HEADER + 2), T_j * row, 4 * T_j * S)
            w = windows.peer(j, o[-1])
            src = handle.recv_src_idx[a:b]
            torch.index_select(view(w, o[1], torch.uint8, T_j, row), 0, src, out=recv[a:b])
            if S:
                dst = out.recv_scales[a:b].view(torch.int32)
                torch.index_select(view(w, o[2], torch.int32, T_j, S), 0, src, out=dst)

    event = _finish(comm, finish, (data, scales), step, async_finish)
    if not async_finish:
        event.current_stream_wait()
    out_x = out.recv_x if out.recv_scales is None else (out.recv_x, out.recv_scales)
    return out_x, None, None, None, None, event


def combine(comm, windows, fields: list, handle: DispatchHandle, biases, combined, combined_w, async_finish: bool):
    """`normal.combine` over the windows: `fields` is `[x rows, (top-k weights)]` of the dispatched tokens."""
    R, rank = comm.group_size, comm.rank
    x = fields[0]
    num_recv, hidden = x.shape
    K = fields[1].shape[1] if len(fields) > 1 else 0
    row = hidden * x.element_size()
    offs = sections(8 * (HEADER + 2), num_recv * row, 4 * num_recv * K)
    windows.begin()
    win = windows.own(offs[-1])
    win[: 8 * (HEADER + 2)].view(torch.int64).copy_(
        torch.tensor([MAGIC, OP_COMBINE, row + 4 * K, 0, 0, 0, num_recv, K], device="cpu")
    )
    x_off = split_offsets(handle.recv_splits)
    a, b = x_off[rank], x_off[rank + 1]  # this rank's own rows are read from x itself
    mine = view(win, offs[1], x.dtype, num_recv, hidden)
    mine[:a].copy_(x[:a])
    mine[b:].copy_(x[b:])
    if K:
        view(win, offs[2], torch.float32, num_recv, K).copy_(fields[1])
    step = "combine: token exchange (shared memory)"

    def finish() -> None:
        windows.barrier(comm.timeout, step)
        heads = read_headers(windows, R, HEADER + 2, step)
        back_off = split_offsets(handle.send_splits)
        prefix = handle.rank_prefix_matrix.tolist()
        rows, weights = [], []
        for j in range(R):
            n_j = int(heads[j][HEADER])
            o = sections(8 * (HEADER + 2), n_j * row, 4 * n_j * K)
            w = windows.peer(j, o[-1])
            first = prefix[rank - 1][j] if rank else 0  # rows rank j received from ranks before this one
            n = back_off[j + 1] - back_off[j]
            if first + n > n_j:  # the ranks' handles come from different dispatches
                raise EPCommError(f"{step}: rank {j} holds {n_j} rows, this rank's handle expects {first + n}")
            rows.append((x if j == rank else view(w, o[1], x.dtype, n_j, hidden))[first : first + n])
            if K:
                weights.append((fields[1] if j == rank else view(w, o[2], torch.float32, n_j, K))[first : first + n])

        perm, offsets = sum_copies(comm, handle, combined, rows, biases)
        if combined_w is not None:
            combined_w.copy_(sum_bags(torch.cat(weights), perm, offsets))

    event = _finish(comm, finish, tuple(fields), step, async_finish)
    if not async_finish:
        event.current_stream_wait()
    return combined, combined_w, event
