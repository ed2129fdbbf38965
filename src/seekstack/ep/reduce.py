"""The fp32 reductions of combine: each token's received rows summed left to right, then rounded once.

Rows arrive grouped by peer rank; within a peer's block they are in token order. A token's rows ("bag") are listed
by `perm[offsets[t]:offsets[t+1]]` in the order the sum must take (rank order for normal combine, top-k order
for low-latency combine), and `embedding_bag(mode="sum")` gathers and adds them in one pass, accumulating each bag
sequentially from zero in fp32 on CPU (fbgemm) and CUDA alike — the reference's loop `acc += row`.

On CPU the rows are widened to fp32 first (the bf16 kernel would round half away from zero, not to nearest even),
which is the costly part; `reduce_tiles` does it one token tile at a time into a small buffer, so the widened
rows, the fp32 sums and their cast stay in cache.

>>> import torch
>>> rows = torch.tensor([[1.0], [2.0], [4.0]])
>>> sum_bags(rows, torch.tensor([2, 0, 1]), torch.tensor([0, 2])).flatten().tolist()
[5.0, 2.0]
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .fused_sum import fused_sum
from .routing import DispatchHandle, combine_index

_MAX_TILES = 64
_TILE_BYTES = 2 << 20  # widened fp32 rows per tile: 2 MiB, a core's L2 here (~70 tokens of 4 copies at H = 2048)


def sum_bags(rows: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """fp32 `[len(offsets), ...]`: for each bag t, `0 + rows[perm[o_t]] + rows[perm[o_t + 1]] + ...` left to right.

    `rows` must be fp32 (see the module docstring); empty bags give zeros.
    """
    if perm.numel() == 0:
        return torch.zeros((offsets.shape[0], *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    return F.embedding_bag(perm, rows, offsets, mode="sum")


def tile_bounds(num_tokens: int, num_rows: int, hidden: int, device: torch.device) -> list[int]:
    """Token tile boundaries: ~`_TILE_BYTES` of widened rows per tile on CPU (from the mean rows per token), at
    most `_MAX_TILES` tiles (each costs ~7 small ops); one tile on GPUs (fewer, larger kernels)."""
    step = num_tokens
    if device.type == "cpu":
        step = _TILE_BYTES * max(num_tokens, 1) // (4 * max(hidden, 1) * max(num_rows, 1))
        step = max(step, -(-num_tokens // _MAX_TILES))
    return [*range(0, max(num_tokens, 1), max(step, 1)), num_tokens]


def block_starts(per_token_rows, bounds: list[int], block_offsets: list[int]) -> list[list[int]]:
    """`starts[k][j]`: the first row of block j belonging to a token >= bounds[k].

    `block_offsets` is `split_offsets` of the blocks (R + 1 entries). `per_token_rows()` returns `[T, R]`: how many
    rows token t has in block j (blocks are token-ordered); it is only called when there is more than one tile.
    """
    if len(bounds) == 2:
        return [block_offsets[:-1], block_offsets[1:]]
    counts = per_token_rows().to(device="cpu", dtype=torch.int64)
    prefix = torch.zeros(counts.shape[0] + 1, counts.shape[1], dtype=torch.int64, device="cpu")
    torch.cumsum(counts, 0, out=prefix[1:])
    return [[block_offsets[j] + c for j, c in enumerate(row)] for row in prefix[bounds].tolist()]


def reduce_tiles(
    out: torch.Tensor,
    widen: Callable[[torch.Tensor, int, int], None],
    perm: torch.Tensor,
    offsets: torch.Tensor,
    bounds: list[int],
    starts: list[list[int]],
    scratch: Callable[[int], torch.Tensor],
    biases: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """`out[t] = cast(Σ bag t (+ biases[t]))`, one token tile at a time; returns the scratch buffer it used.

    Tile k needs block j's rows `starts[k][j]:starts[k + 1][j]`; `widen(dst, s, e)` writes rows s..e as fp32 into
    `dst`. The tile's rows are widened into one small buffer (`scratch(rows)` gives an fp32 `[rows, H]` tensor)
    and the bags are renumbered into it, so the widened rows and their sums stay in cache: with four ranks
    competing for memory this took 25-29 ms where whole-tensor passes took 42-50 ms (1024 x 2048, 4 processes).
    """
    total, tiles = perm.numel(), len(bounds) - 1
    sizes = [[e - s for s, e in zip(starts[k], starts[k + 1], strict=True)] for k in range(tiles)]
    base = [[sum(row[:j]) for j in range(len(row))] for row in sizes]
    buf = scratch(max((sum(row) for row in sizes), default=0))
    if tiles == 1:
        local, bag_at = perm, [0, total]
    else:
        # Row p of block j, tile k sits at base[k][j] + (p - starts[k][j]) of the tile buffer; blocks come first
        # in row order, so the shifts are laid out j-major.
        shifts = [base[k][j] - starts[k][j] for j in range(len(base[0])) for k in range(tiles)]
        lengths = [sizes[k][j] for j in range(len(base[0])) for k in range(tiles)]
        dev = perm.device
        shift = torch.repeat_interleave(torch.tensor(shifts, device=dev), torch.tensor(lengths, device=dev))
        local = (torch.arange(shift.numel(), device=dev) + shift).index_select(0, perm)
        every = [*offsets.tolist(), total]
        bag_at = [every[t] for t in bounds]
    for k in range(tiles):
        t0, t1 = bounds[k], bounds[k + 1]
        for j, (s, n) in enumerate(zip(starts[k], sizes[k], strict=True)):
            if n:
                widen(buf[base[k][j] : base[k][j] + n], s, s + n)
        o0, o1 = bag_at[k], bag_at[k + 1]
        acc = sum_bags(buf, local[o0:o1], offsets[t0:t1] - o0 if o0 else offsets[t0:t1])
        for b in biases:
            acc.add_(b[t0:t1])  # a bf16 bias is widened exactly and added in fp32, as DeepEP adds it
        out[t0:t1].copy_(acc)
    return buf


def sum_copies(comm, handle: DispatchHandle, out: torch.Tensor, blocks: list[torch.Tensor], biases=()):
    """Normal combine's sum: `out[t] = cast(Σ copies of token t, lowest rank first (+ biases))`.

    `blocks[j]` holds the copies rank j returned, in token order (token t has one iff `is_token_in_rank[t, j]`).
    On CPU a large sum runs as one compiled loop (`fused_sum`), otherwise tile by tile here. Returns the bags
    `(perm, offsets)` for the top-k weights.
    """
    hidden, dev = out.shape[1], out.device
    perm, offsets = combine_index(handle)
    if fused_sum(out, blocks, handle.is_token_in_rank, biases):
        return perm, offsets
    back_off = [0]
    for b in blocks:
        back_off.append(back_off[-1] + b.shape[0])

    def widen(dst: torch.Tensor, s: int, e: int) -> None:
        j = bisect.bisect_right(back_off, s) - 1
        dst.copy_(blocks[j][s - back_off[j] : e - back_off[j]])

    def scratch(n: int) -> torch.Tensor:
        return comm.take_scratch("combine_f32", (n, hidden), torch.float32, dev)

    bounds = tile_bounds(handle.num_tokens, back_off[-1], hidden, dev)
    starts = block_starts(lambda: handle.is_token_in_rank, bounds, back_off)
    comm.give_scratch("combine_f32", reduce_tiles(out, widen, perm, offsets, bounds, starts, scratch, biases))
    return perm, offsets
