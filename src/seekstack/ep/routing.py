"""What normal-mode dispatch and combine agree on, whatever the wire: the count header, the receive plan built from
every rank's header, the handle, and the per-token fields that travel next to the hidden states.

The header (int64) is `[magic, op, row_bytes, num_worst_tokens, expert_alignment, num_experts]`, then the tokens
the rank sends to each rank (`R`), then its tokens per global expert (`E`). The per-token fields are one int32 row
per token: `[fp8 scales | top-k expert ids + 1 | top-k weights as bits | source index]`.

>>> pad(5, 4), pad(8, 4)
(8, 8)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .events import EPCommError, EventOverlap

MAGIC = 0x45505F31  # "EP_1": a peer that sends anything else is not in the same call
OP_DISPATCH, OP_COMBINE, OP_CACHED_DISPATCH, OP_LL_DISPATCH, OP_LL_COMBINE = 1, 2, 3, 4, 5
HEADER = 6  # magic, op, row_bytes, num_worst_tokens, expert_alignment, num_experts


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


class Fields(NamedTuple):
    """The shape of one dispatch's per-token int32 row (see the module docstring)."""

    num_scales: int
    num_topk: int
    has_weights: bool
    num_experts: int

    @property
    def cols(self) -> int:
        return self.num_scales + self.num_topk * (2 if self.has_weights else 1) + 1


class Plan(NamedTuple):
    """What this rank receives, from every rank's header."""

    recv_splits: list[int]
    num_recv: int
    per_expert_list: tuple[int, ...]
    rank_prefix_matrix: torch.Tensor


def pad(count: int, alignment: int) -> int:
    return (count + alignment - 1) // alignment * alignment


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


def check_headers(rows: list[list[int]], step: str) -> None:
    """Every rank must be in the same call with the same row layout; otherwise all ranks raise the same error."""
    names = {0: "magic", 1: "operation", 2: "row bytes", 5: "num_experts"}
    for i, row in enumerate(rows):
        for k, name in names.items():
            if row[k] != rows[0][k]:
                raise EPCommError(
                    f"{step}: rank {i} disagrees with rank 0 on {name} "
                    f"({row[k]} vs {rows[0][k]}); every rank must make the same call"
                )


def plan_receive(headers: torch.Tensor, rank: int, step: str) -> Plan:
    """The receive plan from every rank's dispatch header `[R, HEADER + R + E]` (CPU or device tensor)."""
    R = headers.shape[0]
    rows = headers.tolist()  # the one host round trip of a normal dispatch (DeepEP has it too)
    check_headers(rows, step)
    recv_splits = [rows[i][HEADER + rank] for i in range(R)]
    # Checked for every rank on every rank, so all of them raise together rather than leaving peers waiting.
    for i in range(R):
        worst, total = rows[i][3], sum(rows[j][HEADER + i] for j in range(R))
        if worst and total > worst:
            raise ValueError(f"num_worst_tokens ({worst}) of rank {i} is smaller than the {total} tokens it receives")
    experts_per_rank, alignment = rows[0][5] // R, rows[rank][4]
    base = HEADER + R + rank * experts_per_rank
    # Column sums of the host rows via zip (an indexed double loop took ~0.2 ms at E = 256; a tensor op on the
    # header would add a device sync under NCCL).
    per_expert = tuple(pad(sum(col), alignment) for col in zip(*(r[base : base + experts_per_rank] for r in rows)))
    prefix = headers[:, HEADER : HEADER + R].cumsum(0).to(torch.int32)
    return Plan(recv_splits, sum(recv_splits), per_expert, prefix)


def fill_token_fields(table: torch.Tensor, scales, topk_idx, topk_weights) -> torch.Tensor:
    """Write each token's int32 row (see the module docstring) into `table [T, cols]`; returns it."""
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
    table[:, col].copy_(torch.arange(table.shape[0], dtype=torch.int32, device=table.device))
    return table


class Received(NamedTuple):
    """Dispatch outputs; rows past `num_recv` are `num_worst_tokens` padding (zeros, top-k ids -1)."""

    recv_x: torch.Tensor
    recv_scales: torch.Tensor | None
    recv_topk_idx: torch.Tensor | None
    recv_topk_weights: torch.Tensor | None
    recv_src_idx: torch.Tensor


def alloc_received(comm, data, scales, fields: Fields, out_rows: int, num_recv: int) -> Received:
    """Outputs for received rows; only the padding is initialised (the rest is overwritten)."""
    dev = data.device
    recv_x = comm.take_output("recv_x", (out_rows, data.shape[1]), data.dtype, dev)
    recv_x[num_recv:].zero_()
    recv_scales = recv_idx = recv_w = None
    if scales is not None:
        recv_scales = comm.take_output("recv_scales", (out_rows, scales.shape[1]), scales.dtype, dev)
        recv_scales[num_recv:].zero_()
    if fields.num_topk:
        recv_idx = torch.empty((out_rows, fields.num_topk), dtype=torch.int64, device=dev)
        recv_idx[num_recv:] = -1
        if fields.has_weights:
            recv_w = torch.empty((out_rows, fields.num_topk), dtype=torch.float32, device=dev)
            recv_w[num_recv:] = 0.0
    return Received(recv_x, recv_scales, recv_idx, recv_w, torch.empty(num_recv, dtype=torch.int32, device=dev))


def unpack_token_fields(comm, rows: torch.Tensor, out: Received, fields: Fields) -> None:
    """Spread the received int32 rows `[num_recv, cols]` over the outputs, mapping expert ids to local ids."""
    num_recv, k = rows.shape[0], fields.num_topk
    col = 0
    if out.recv_scales is not None:
        out.recv_scales[:num_recv].view(torch.int32).copy_(rows[:, : fields.num_scales])
        col = fields.num_scales
    if out.recv_topk_idx is not None:
        # Global ids + 1 → this rank's local ids, -1 for experts elsewhere: one table lookup, no masks.
        ids = rows[:, col : col + k].reshape(-1)
        local = local_expert_table(comm, fields.num_experts, rows.device).index_select(0, ids).view(num_recv, k)
        out.recv_topk_idx[:num_recv].copy_(local)
        col += k
        if out.recv_topk_weights is not None:
            # Weights of experts elsewhere become +0.0 (as `where(mine, w, 0)`): their bits AND 0.
            keep = (local >> 31).bitwise_not_()
            w_bits = out.recv_topk_weights[:num_recv].view(torch.int32)
            torch.bitwise_and(rows[:, col : col + k], keep, out=w_bits)
            col += k
    out.recv_src_idx.copy_(rows[:, col])


def make_handle(plan: Plan, send_order, out: Received, is_token_in_rank, send_splits, num_tokens: int, worst: int):
    """The handle of a dispatch (see `DispatchHandle`)."""
    return DispatchHandle(
        plan.rank_prefix_matrix,
        send_order,
        out.recv_src_idx,
        is_token_in_rank,
        tuple(send_splits),
        tuple(plan.recv_splits),
        num_tokens,
        plan.num_recv,
        worst,
        plan.per_expert_list,
    )


def dispatch_result(out: Received, handle: DispatchHandle, event: EventOverlap, async_finish: bool):
    """`dispatch`'s return tuple; a synchronous call finishes the event first."""
    if not async_finish:
        event.current_stream_wait()
    out_x = out.recv_x if out.recv_scales is None else (out.recv_x, out.recv_scales)
    expert_list = [] if handle.num_worst_tokens else list(handle.num_recv_tokens_per_expert_list)
    return out_x, out.recv_topk_idx, out.recv_topk_weights, expert_list, handle, event


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


def combine_index(handle: DispatchHandle) -> tuple[torch.Tensor, torch.Tensor]:
    """`(perm, offsets)`: the returned rows of each token, lowest rank first, as `embedding_bag` bags.

    Returned rows are grouped by rank and in token order within a rank (`send_order`), so a stable sort by token
    lists each token's copies in rank order; `offsets[t]` is where token t's copies start.
    """
    perm = torch.sort(handle.send_order, stable=True).indices
    counts = handle.is_token_in_rank.sum(1)
    return perm, counts.cumsum(0) - counts
