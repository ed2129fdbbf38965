"""The wire: rows moved between ranks with split sizes, on any torch.distributed backend and device.

An exchange moves tensors `[rows, ...]` whose rows are grouped by destination rank (send side) and by source rank
(receive side), with per-rank row counts (`splits`). Two forms carry it:

- `p2p` (gloo): one `isend`/`irecv` per peer and field. The rows a rank keeps never touch the wire or a staging
  buffer (the caller writes them straight into the output), and receives land in the output tensors themselves.
- `all_to_all` (NCCL and the rest): one `all_to_all_single` per field; collectives are stream-ordered on GPUs, and
  NCCL's grouped send/recv semantics make per-peer point-to-point calls outside a group unsafe (two ranks sending
  to each other first would deadlock).

One-byte types (fp8) travel as uint8 views: gloo has no float8 type, and bytes keep results bit-exact. Every
collective runs with `async_op=True` and is waited on with the buffer's timeout, so a dead or stuck peer ends in
`EPCommError`, never a silent hang.

>>> split_offsets([2, 0, 3])
[0, 2, 2, 5]
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .events import EPCommError, wait_work


def split_offsets(splits) -> list[int]:
    """`[0, s0, s0+s1, ...]`: where each peer's rows start (and the total at the end)."""
    out = [0]
    for s in splits:
        out.append(out[-1] + int(s))
    return out


def wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as every backend can move it: 1-byte types (fp8) travel as uint8, the rest as themselves."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def start_all_to_all(group, recv, send, recv_splits, send_splits, step: str):
    """Launch an (uneven) `all_to_all_single` on dim 0 (splits in rows, None = even); returns the `Work`."""
    try:
        return dist.all_to_all_single(
            wire(recv),
            wire(send),
            output_split_sizes=recv_splits,
            input_split_sizes=send_splits,
            group=group,
            async_op=True,
        )
    except Exception as exc:
        raise EPCommError(f"{step}: {type(exc).__name__}: {exc}") from exc


def all_to_all(group, recv, send, recv_splits, send_splits, timeout: datetime.timedelta | None, step: str) -> None:
    """Synchronous `all_to_all_single` with a timeout."""
    wait_work(start_all_to_all(group, recv, send, recv_splits, send_splits, step), timeout, step)


def gather_headers(group, header: torch.Tensor, num_ranks: int, timeout, step: str) -> torch.Tensor:
    """Every rank's int64 header vector, `[R, L]`: an all-gather done as an even `all_to_all_single`."""
    send = header.repeat(num_ranks)
    recv = torch.empty_like(send)
    all_to_all(group, recv, send, None, None, timeout, step)
    return recv.view(num_ranks, -1)


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


def peers_of(rank: int, num_ranks: int) -> list[int]:
    """Every other rank, starting after `rank`: staggered, so the ranks do not all start on the same peer."""
    return [(rank + d) % num_ranks for d in range(1, num_ranks)]


def post_exchange(comm, fields, send_splits, recv_splits, step: str) -> dict[int, list]:
    """Start moving `fields`, `(send, recv)` pairs of row-grouped tensors; returns `{peer: [Work, ...]}`.

    `send` is a tensor in send order, or a function `rows(a, b)` that returns send-order rows a..b (gathering them
    just before they leave). With `comm.p2p` each peer's rows go in their own send/receive (tag = field index), a
    peer's rows are gathered right before its send, so the socket copies them while they are still in cache, and
    the rows this rank keeps are not moved: the caller writes them into `recv` itself. Otherwise each field is one
    `all_to_all_single` whose send tensor holds every row, this rank's own included; its works are under key -1.
    """
    if not comm.p2p:
        n = sum(send_splits)
        sends = [s(0, n) if callable(s) else s for s, _ in fields]
        return {
            -1: [
                start_all_to_all(comm.group, r, s, recv_splits, send_splits, step)
                for s, (_, r) in zip(sends, fields, strict=True)
            ]
        }
    send_off, recv_off = split_offsets(send_splits), split_offsets(recv_splits)
    works: dict[int, list] = {}
    peers = peers_of(comm.rank, comm.group_size)
    for j in peers:  # receives first, so every send finds its receive posted
        if recv_splits[j]:
            a, b = recv_off[j], recv_off[j + 1]
            works[j] = [start_recv(comm.group, r[a:b], j, tag, step) for tag, (_, r) in enumerate(fields)]
    sends = []
    for j in peers:
        a, b = send_off[j], send_off[j + 1]
        if b > a:
            for tag, (s, _) in enumerate(fields):
                sends.append(start_send(comm.group, s(a, b) if callable(s) else s[a:b], j, tag, step))
    works[comm.group_size] = sends  # after every receive, in `wait_all`'s order
    return works


def wait_all(works: dict[int, list], timeout, step: str) -> None:
    """Wait for every Work of `post_exchange`, receives before sends; each exactly once (gloo's point-to-point
    Work waits for one more message each time it is waited on), so the dict is emptied."""
    for key in sorted(works):
        for w in works.pop(key):
            wait_work(w, timeout, step)
