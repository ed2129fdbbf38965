"""Normal (high-throughput) dispatch and combine: DeepEP's intranode/internode kernels as two packed exchanges.

Dispatch: every rank all-gathers a small int64 header (its row width and its token counts per rank and per expert),
so each rank knows what it will receive, then one uneven `all_to_all_single` moves the packed token rows. A token
travels once to each rank that holds any of its experts; rows arrive grouped by source rank, in source order.
Combine sends the rows back along the reversed splits and adds the copies of each token in fp32, in rank order,
which makes the result deterministic and bit-identical to a plain all_to_all_single reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .events import EPCommError, EventOverlap, wait_work
from .transport import (
    byte_width,
    pack_rows,
    split_offsets,
    start_all_to_all,
    start_recv,
    start_send,
    unpack_field,
    wire,
)

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
        return data, scales
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_tokens, hidden] tensor or a (fp8, scales) pair")
    return x, None


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
    """See `Buffer.dispatch`; `comm` supplies `group`, `rank`, `group_size` and `timeout`."""
    data, scales = split_x(x)
    num_tokens, hidden = data.shape
    R, rank = comm.group_size, comm.rank
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
    if topk_weights is not None:
        if topk_idx is None:
            raise ValueError("topk_weights needs topk_idx")
        if topk_weights.shape != topk_idx.shape or topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32 {list(topk_idx.shape)}")

    # Rows to send, grouped by destination rank and in token order within a rank.
    dest_tok = is_token_in_rank.t().nonzero()
    send_order = dest_tok[:, 1].contiguous()
    # The small per-token fields (fp8 scales included) travel together in one packed row; the hidden states travel
    # on their own, straight into the output tensor.
    payload = [data]
    meta = [] if scales is None else [scales]
    if topk_idx is not None:
        meta.append(topk_idx.long())
    if topk_weights is not None:
        meta.append(topk_weights)
    meta.append(torch.arange(num_tokens, dtype=torch.int32, device=data.device))
    row_bytes = sum(byte_width(tuple(f.shape[1:]), f.dtype) for f in payload + meta)

    header = torch.cat(
        [
            torch.tensor([_MAGIC, _OP_DISPATCH, row_bytes, num_worst_tokens, expert_alignment, num_experts]),
            send_counts.cpu(),
            num_tokens_per_expert.to(torch.int64).cpu(),
        ]
    )
    # The count exchange is a round trip on the critical path: the send side's packing, which needs no counts from
    # the peers, runs while it is in flight.
    header_send = header.repeat(R)
    header_recv = torch.empty_like(header_send)
    hstep = "dispatch: count exchange"
    hwork = start_all_to_all(comm.group, header_recv, header_send, None, None, hstep)
    send_splits = send_counts.tolist()
    meta_send = pack_rows(meta, send_order)
    stages, staged = _pack_remote(comm, [(data, send_order)], send_splits, "dispatch")
    wait_work(hwork, comm.timeout, hstep)
    headers = header_recv.view(R, -1)
    _check_headers(headers, header, rank)
    counts = headers[:, _HEADER : _HEADER + R]  # counts[i][j]: tokens rank i sends to rank j
    recv_splits = counts[:, rank].tolist()
    num_recv = sum(recv_splits)
    # Checked for every rank on every rank, so all of them raise together rather than leaving peers waiting.
    for i, (worst, total) in enumerate(zip(headers[:, 3].tolist(), counts.sum(0).tolist(), strict=True)):
        if worst and total > worst:
            raise ValueError(f"num_worst_tokens ({worst}) of rank {i} is smaller than the {total} tokens it receives")
    per_expert = headers[:, _HEADER + R + rank * experts_per_rank : _HEADER + R + (rank + 1) * experts_per_rank]
    per_expert_list = tuple(_pad(int(c), expert_alignment) for c in per_expert.sum(0).tolist())
    rank_prefix_matrix = counts.cumsum(0).to(torch.int32)

    out_rows = num_worst_tokens or num_recv
    recv_x, recv_scales = _alloc_recv(comm, data, scales, out_rows, num_recv)
    meta_recv = torch.empty(num_recv, meta_send.shape[1], dtype=torch.uint8, device=data.device)
    fields = [(data, send_order, recv_x[:num_recv]), (meta_send, None, meta_recv)]
    step = "dispatch: token exchange"
    works, _ = _post_exchange(comm, fields, send_splits, recv_splits, step, "dispatch", stages)
    num_topk = 0 if topk_idx is None else topk_idx.shape[1]
    recv_topk_idx = None if topk_idx is None else torch.full((out_rows, num_topk), -1, dtype=torch.int64)
    recv_topk_weights = None if topk_weights is None else torch.zeros(out_rows, num_topk, dtype=torch.float32)
    recv_src_idx = torch.empty(num_recv, dtype=torch.int32, device=data.device)

    def finish() -> None:
        for w in works:
            wait_work(w, comm.timeout, step)
        _give_back(comm, staged)
        col = 0
        if recv_scales is not None:
            unpack_field(meta_recv, 0, tuple(recv_scales.shape[1:]), recv_scales.dtype, recv_scales[:num_recv])
            col += byte_width(tuple(recv_scales.shape[1:]), recv_scales.dtype)
        if recv_topk_idx is not None:
            glob = unpack_field(meta_recv, col, (num_topk,), torch.int64)
            col += 8 * num_topk
            local = glob - rank * experts_per_rank
            mine = (glob >= 0) & (local >= 0) & (local < experts_per_rank)
            recv_topk_idx[:num_recv] = torch.where(mine, local, -1)
            if recv_topk_weights is not None:
                w = unpack_field(meta_recv, col, (num_topk,), torch.float32)
                col += 4 * num_topk
                # Weights of experts on other ranks are zeroed, so combining them sums back to the originals.
                recv_topk_weights[:num_recv] = torch.where(mine, w, 0.0)
        unpack_field(meta_recv, col, (), torch.int32, recv_src_idx)

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
    event = EventOverlap([], finish, (data, scales, meta_send, meta_recv), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
    expert_list = [] if num_worst_tokens else list(per_expert_list)
    return out_x, recv_topk_idx, recv_topk_weights, expert_list, handle, event


def _alloc_recv(comm, data, scales, out_rows: int, num_recv: int):
    """Outputs for received rows; only the `num_worst_tokens` padding is zeroed (the rest is overwritten)."""
    recv_x = comm.take_output("recv_x", (out_rows, data.shape[1]), data.dtype)
    recv_x[num_recv:].zero_()
    recv_scales = None
    if scales is not None:
        recv_scales = comm.take_output("recv_scales", (out_rows, scales.shape[1]), scales.dtype)
        recv_scales[num_recv:].zero_()
    return recv_x, recv_scales


def _pack_remote(comm, fields, send_splits, scratch: str):
    """Gather the rows every peer but this rank gets, `(source, order)` per field, into reused staging memory.

    Returns `({field index: stage}, [(scratch name, stage)])` for `_post_exchange` and `_give_back`.
    """
    rank = comm.rank
    send_off = split_offsets(send_splits)
    stages, staged = {}, []
    if not sum(send_splits) - send_splits[rank]:
        return stages, staged
    for tag, (src, order) in enumerate(fields):
        src_w = wire(src.contiguous())
        stage = comm.take_scratch(f"{scratch}{tag}", (send_off[-1], *src_w.shape[1:]), src_w.dtype)
        for j in range(comm.group_size):
            if j != rank and send_splits[j]:
                torch.index_select(
                    src_w, 0, order[send_off[j] : send_off[j + 1]], out=stage[send_off[j] : send_off[j + 1]]
                )
        stages[tag] = stage
        staged.append((f"{scratch}{tag}", stage))
    return stages, staged


def _post_exchange(comm, fields, send_splits, recv_splits, step: str, scratch: str, stages=None):
    """Post the point-to-point sends and receives of one dispatch-like exchange; returns `(works, staged)`.

    `fields` holds `(source, order, out)` triples: the rows `source[order]` (or `source` itself, already in send
    order, when `order` is None) go out grouped by destination rank; `out` receives rows in source-rank order.
    Receives land straight in `out` (no unpacking copy), the rows a rank sends itself are copied from the source
    into `out` without touching the wire, and each peer's rows are gathered into reused staging memory and sent
    at once, so the gather for the next peer overlaps the previous peer's transfer. `stages` (from `_pack_remote`)
    holds fields whose rows were gathered already.
    """
    R, rank = comm.group_size, comm.rank
    send_off, recv_off = split_offsets(send_splits), split_offsets(recv_splits)
    peers = [(rank + d) % R for d in range(1, R)]  # staggered, so the ranks do not all start on the same peer
    works, staged = [], []
    for tag, (_, _, out) in enumerate(fields):
        out_w = wire(out)
        for j in peers:
            if recv_splits[j]:
                works.append(start_recv(comm.group, out_w[recv_off[j] : recv_off[j + 1]], j, tag, step))
    for tag, (src, order, out) in enumerate(fields):
        src_w, out_w = wire(src.contiguous()), wire(out)
        stage = (stages or {}).get(tag)
        if stage is None and order is not None and sum(send_splits) - send_splits[rank]:
            stage = comm.take_scratch(f"{scratch}{tag}", (send_off[-1], *src_w.shape[1:]), src_w.dtype)
            staged.append((f"{scratch}{tag}", stage))
        for j in peers:
            if not send_splits[j]:
                continue
            a, b = send_off[j], send_off[j + 1]
            if order is None:
                rows = src_w[a:b]
            elif stages and tag in stages:
                rows = stage[a:b]
            else:
                rows = torch.index_select(src_w, 0, order[a:b], out=stage[a:b])
            works.append(start_send(comm.group, rows, j, tag, step))
        a, b = send_off[rank], send_off[rank + 1]
        dst = out_w[recv_off[rank] : recv_off[rank + 1]]
        if order is None:
            dst.copy_(src_w[a:b])
        else:
            torch.index_select(src_w, 0, order[a:b], out=dst)
    return works, staged


def _give_back(comm, staged) -> None:
    for name, t in staged:
        comm.give_scratch(name, t)


def _check_headers(headers: torch.Tensor, mine: torch.Tensor, rank: int) -> None:
    """Every rank must be in the same call with the same row layout; otherwise all ranks raise the same error."""
    names = {0: "magic", 1: "operation", 2: "row bytes", 5: "num_experts"}
    for i in range(headers.shape[0]):
        for k, name in names.items():
            if int(headers[i, k]) != int(headers[0, k]):
                raise EPCommError(
                    f"dispatch: count exchange: rank {i} disagrees with rank 0 on {name} "
                    f"({int(headers[i, k])} vs {int(headers[0, k])}); every rank must make the same call"
                )


def _cached_dispatch(comm, data, scales, handle: DispatchHandle, async_finish: bool):
    """Dispatch along a previous call's routing: no count exchange, no top-k, only the rows."""
    if not isinstance(handle, DispatchHandle):
        raise ValueError("handle must come from a previous dispatch")
    if data.shape[0] != handle.num_tokens:
        raise ValueError(f"x has {data.shape[0]} tokens, the handle was made for {handle.num_tokens}")
    num_recv = handle.num_recv_tokens
    recv_x, recv_scales = _alloc_recv(comm, data, scales, handle.num_worst_tokens or num_recv, num_recv)
    payload = [data] + ([scales] if scales is not None else [])
    outs = [recv_x[:num_recv]] + ([recv_scales[:num_recv]] if recv_scales is not None else [])
    fields = [(f, handle.send_order, o) for f, o in zip(payload, outs, strict=True)]
    step = "cached dispatch: token exchange"
    works, staged = _post_exchange(comm, fields, list(handle.send_splits), list(handle.recv_splits), step, "dispatch")

    def finish() -> None:
        for w in works:
            wait_work(w, comm.timeout, step)
        _give_back(comm, staged)

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
    hidden = x.shape[1]
    fields = [x[:num_recv]]
    if topk_weights is not None:
        if topk_weights.dim() != 2 or topk_weights.shape[0] != x.shape[0] or topk_weights.dtype != torch.float32:
            raise ValueError(f"topk_weights must be float32 [{x.shape[0]}, num_topk]")
        fields.append(topk_weights[:num_recv])
    if bias is None or isinstance(bias, torch.Tensor):
        biases = () if bias is None else (bias,)
    else:
        biases = tuple(b for b in bias if b is not None)
    if len(biases) > 2:
        raise ValueError("bias takes at most two tensors")
    for b in biases:
        if tuple(b.shape) != (handle.num_tokens, hidden):
            raise ValueError(f"bias must be [{handle.num_tokens}, {hidden}], got {list(b.shape)}")
    R, rank = comm.group_size, comm.rank
    step = "combine: token exchange"
    # Rows come back along the reversed dispatch splits. Rows received by dispatch are grouped by source rank, so
    # each peer's rows are one contiguous slice of x: they are sent as they are, with no packing.
    fields = [f.contiguous() for f in fields]
    back_splits, x_splits = list(handle.send_splits), list(handle.recv_splits)
    back_off, x_off = split_offsets(back_splits), split_offsets(x_splits)
    peers = [(rank + d) % R for d in range(1, R)]
    recvs: dict[int, list] = {}
    staged = []
    for tag, f in enumerate(fields):
        name = f"combine{tag}"
        stage = comm.take_scratch(name, (back_off[-1], *f.shape[1:]), f.dtype)
        staged.append((name, stage))
        for j in peers:
            if back_splits[j]:
                blk = stage[back_off[j] : back_off[j + 1]]
                recvs.setdefault(j, []).append(start_recv(comm.group, blk, j, tag, step))
    sends = []
    for tag, f in enumerate(fields):
        for j in peers:
            if x_splits[j]:
                sends.append(start_send(comm.group, f[x_off[j] : x_off[j + 1]], j, tag, step))
    combined = comm.take_output("combined", (handle.num_tokens, hidden), x.dtype)
    num_topk = 0 if topk_weights is None else topk_weights.shape[1]
    combined_w = None if topk_weights is None else torch.empty(handle.num_tokens, num_topk, dtype=torch.float32)

    def finish() -> None:
        acc = comm.take_scratch("combine_acc", (handle.num_tokens, hidden), torch.float32).zero_()
        conv = comm.take_scratch("combine_conv", (max(back_splits, default=0), hidden), torch.float32)
        accw = None if combined_w is None else torch.zeros(handle.num_tokens, num_topk, dtype=torch.float32)
        # Rank order: each token's copies are added lowest rank first, exactly as the reference does; a peer's
        # block is reduced as soon as it has arrived, while later peers' blocks are still on the wire.
        for j in range(R):
            n = back_splits[j]
            if not n:
                continue
            if j == rank:
                blocks = [f[x_off[rank] : x_off[rank + 1]] for f in fields]
            else:
                for w in recvs[j]:
                    wait_work(w, comm.timeout, step)
                blocks = [st[back_off[j] : back_off[j + 1]] for _, st in staged]
            idx = handle.send_order[back_off[j] : back_off[j + 1]]
            conv[:n].copy_(blocks[0])
            acc.index_add_(0, idx, conv[:n])
            if accw is not None:
                accw.index_add_(0, idx, blocks[1])
        for w in sends:
            wait_work(w, comm.timeout, step)
        for b in biases:
            acc += b.float()
        combined.copy_(acc)
        if combined_w is not None:
            combined_w.copy_(accw)
        _give_back(comm, [*staged, ("combine_acc", acc), ("combine_conv", conv)])

    event = EventOverlap([], finish, tuple(fields), comm.timeout, step)
    if not async_finish:
        event.current_stream_wait()
    return combined, combined_w, event
