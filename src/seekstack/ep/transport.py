"""The wire: packed byte rows moved with `all_to_all_single` and split sizes, on any torch.distributed backend.

Every exchange moves one uint8 buffer `[rows, row_bytes]`: the fields of a token copy (hidden states, fp8 scales,
top-k ids and weights, source index) side by side. Bytes make the transport dtype-blind, which is what gloo needs
for fp8 (it has no float8 type) and what makes results bit-exact. Collectives always run with `async_op=True` and
are waited on with the buffer's timeout, so a dead or stuck peer ends in `EPCommError`, never a silent hang.

>>> import torch
>>> rows = pack_rows([torch.ones(3, 2, dtype=torch.bfloat16), torch.arange(3, dtype=torch.int32)[:, None]])
>>> rows.shape, rows.dtype
(torch.Size([3, 8]), torch.uint8)
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .events import EPCommError, wait_work


def as_byte_rows(t: torch.Tensor) -> torch.Tensor:
    """View a `[N, ...]` tensor as `[N, bytes_per_row]` uint8 (copying only if it is not contiguous)."""
    t = t.contiguous()
    return t.view(t.shape[0], -1).view(torch.uint8) if t.dim() > 1 else t.view(-1, 1).view(torch.uint8)


def pack_rows(fields: list[torch.Tensor], order: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate the byte rows of `fields` (all `[T, ...]`), keeping rows `order` (all rows if None)."""
    byte_fields = [as_byte_rows(f) for f in fields]
    if len(byte_fields) == 1 and order is None:
        return byte_fields[0]
    rows = byte_fields[0].shape[0] if order is None else order.numel()
    width = sum(f.shape[1] for f in byte_fields)
    out = torch.empty(rows, width, dtype=torch.uint8, device=byte_fields[0].device)
    col = 0
    for f in byte_fields:
        dst = out[:, col : col + f.shape[1]]
        if order is None:
            dst.copy_(f)
        else:
            # index_select writes straight into the strided slice: one copy, and far faster than f[order] on CPU.
            torch.index_select(f, 0, order, out=dst)
        col += f.shape[1]
    return out


def unpack_field(rows: torch.Tensor, col: int, shape_tail: tuple[int, ...], dtype: torch.dtype, out=None):
    """Read one field back from packed byte rows into a fresh (or the given) contiguous tensor."""
    width = torch.empty((), dtype=dtype).element_size()
    for s in shape_tail:
        width *= s
    src = rows[:, col : col + width]
    if out is None:
        out = torch.empty((rows.shape[0], *shape_tail), dtype=dtype, device=rows.device)
    out.view(rows.shape[0], -1).view(torch.uint8).copy_(src)
    return out


def byte_width(shape_tail: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape_tail:
        n *= s
    return n


def start_all_to_all(
    group,
    recv: torch.Tensor,
    send: torch.Tensor,
    recv_splits: list[int] | None,
    send_splits: list[int] | None,
    step: str,
):
    """Launch an uneven `all_to_all_single` on byte rows (splits in rows); returns the `Work`."""
    try:
        return dist.all_to_all_single(
            recv, send, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group, async_op=True
        )
    except Exception as exc:
        raise EPCommError(f"{step}: {type(exc).__name__}: {exc}") from exc


def all_to_all(group, recv, send, recv_splits, send_splits, timeout: datetime.timedelta | None, step: str) -> None:
    """Synchronous uneven `all_to_all_single` with a timeout."""
    wait_work(start_all_to_all(group, recv, send, recv_splits, send_splits, step), timeout, step)


def gather_headers(group, header: torch.Tensor, num_ranks: int, timeout, step: str) -> torch.Tensor:
    """Every rank's int64 header vector, `[R, L]`: an all-gather done as an even `all_to_all_single`."""
    send = header.repeat(num_ranks)
    recv = torch.empty_like(send)
    all_to_all(group, recv, send, None, None, timeout, step)
    return recv.view(num_ranks, -1)


def wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as gloo can move it: 1-byte types (fp8) travel as uint8, the rest as themselves."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def start_send(group, tensor: torch.Tensor, peer: int, tag: int, step: str):
    """Post one point-to-point send of a contiguous tensor to group rank `peer`; returns the `Work`."""
    try:
        return dist.isend(wire(tensor), group=group, group_dst=peer, tag=tag)
    except Exception as exc:
        raise EPCommError(f"{step}: {type(exc).__name__}: {exc}") from exc


def start_recv(group, tensor: torch.Tensor, peer: int, tag: int, step: str):
    """Post one point-to-point receive into a contiguous tensor from group rank `peer`; returns the `Work`."""
    try:
        return dist.irecv(wire(tensor), group=group, group_src=peer, tag=tag)
    except Exception as exc:
        raise EPCommError(f"{step}: {type(exc).__name__}: {exc}") from exc


def split_offsets(splits) -> list[int]:
    """`[0, s0, s0+s1, ...]`: where each peer's rows start (and the total at the end)."""
    out = [0]
    for s in splits:
        out.append(out[-1] + int(s))
    return out
