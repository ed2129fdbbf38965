"""Combine sums on CPU as one compiled loop: gather each token's copies, add them in fp32 lowest rank first
(+ biases), round once to bf16 — what `reduce.reduce_tiles` computes, bit for bit.

Eager torch needs three passes for it (widen the bf16 rows to fp32, `embedding_bag`, cast): 4.2 ms for the
bench's 3.7k copies x 2048 on one core. TorchInductor turns `_sum_kernel` into a single vectorised C++ loop that
reads each bf16 copy once and writes each output once: 0.9 ms. The adds keep their order (a pointwise kernel: no
reassociation), the final cast rounds to nearest even; an absent copy adds +0.0 and a zero sum is made +0.0, as
the reference's sum starting at +0.0 gives. Low-latency combine's weighted sum (`fused_weighted_sum`: each
fp32(row) · w rounded once, then added in top-k order; the generated code keeps product and add apart, no FMA)
takes 5.4-5.9 ms per call in the bench instead of 7.2-10.4.

The first call in a process traces and compiles (4-7 s; the generated library is cached on disk), so the path is
taken only for sums of at least `MIN_ELEMENTS` copied elements (≥ 1.5 ms saved per call; small calls, as in tests
and demos, stay eager);
`SEEKSTACK_CPU_COMPILE` chooses: `auto` (default), `always` (any size, used by the tests) or `off`. Without a
working C++ toolchain, or on any compile error, it warns once and the eager path takes over for the process
(`seekstack.cpu_compile`).

>>> import torch
>>> out = torch.empty(2, 4, dtype=torch.bfloat16)
>>> blocks = [torch.ones(1, 4, dtype=torch.bfloat16), torch.full((2, 4), 2.0, dtype=torch.bfloat16)]
>>> in_rank = torch.tensor([[True, True], [False, True]])  # token 1 has no copy from rank 0
>>> # fused_sum(out, blocks, in_rank) -> True; out == [[3, 3, 3, 3], [2, 2, 2, 2]]
"""

from __future__ import annotations

import torch

from seekstack.cpu_compile import CompiledKernel, mode

MIN_ELEMENTS = 1 << 20  # 1M copied elements: ~1.5 ms saved per call (eager ~0.55 ns per element, compiled ~0.12)
_DUMMY_ROWS = 2  # an empty block is replaced by zero rows; 2, since dynamo specialises sizes 0 and 1


def _positive_zero(acc: torch.Tensor) -> torch.Tensor:
    # The reference adds to +0.0, so its sum is never -0.0 (+0 + -0 = +0); here the first term starts the sum
    # (inductor would fold an explicit `0 + x` into `x` anyway), which differs only in the sign of a zero.
    return torch.where(acc == 0, 0.0, acc)


def _sum_kernel(out: torch.Tensor, blocks: list[torch.Tensor], index: torch.Tensor, biases: list[torch.Tensor]):
    acc = None
    for j, rows in enumerate(blocks):
        at = index[:, j]
        copy = torch.where((at >= 0).unsqueeze(1), rows[at.clamp(min=0)].float(), 0.0)
        acc = copy if acc is None else acc + copy
    acc = _positive_zero(acc)
    for b in biases:
        acc = acc + b.float()  # a bf16 bias widens exactly and adds in fp32, as DeepEP adds it
    out.copy_(acc)


def _weighted_kernel(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, k: int):
    acc = None
    for i in range(k):
        at = index[:, i]
        # fp32(y) * w rounded once, then added: the compiled code keeps the product and the add apart (no FMA)
        term = torch.where((at >= 0).unsqueeze(1), rows[at.clamp(min=0)].float() * weights[:, i : i + 1], 0.0)
        acc = term if acc is None else acc + term
    out.copy_(_positive_zero(acc))


SUM = CompiledKernel("ep combine sum", _sum_kernel)
WEIGHTED = CompiledKernel("ep low-latency combine sum", _weighted_kernel)


def copy_index(in_rank: torch.Tensor) -> torch.Tensor:
    """int64 `[T, R]`: the row of token t's copy within rank j's block (blocks are token-ordered), -1 if absent."""
    mask = in_rank.to(torch.bool)
    rows = torch.cumsum(mask, 0, dtype=torch.int64) - 1
    return torch.where(mask, rows, torch.full_like(rows, -1))


def _wanted(out: torch.Tensor, rows: list[torch.Tensor]) -> bool:
    m = mode()
    if m == "off" or out.device.type != "cpu" or out.dtype != torch.bfloat16:
        return False
    if any(r.dtype != torch.bfloat16 or r.stride(-1) != 1 for r in rows):
        return False
    return m == "always" or sum(r.shape[0] for r in rows) * out.shape[1] >= MIN_ELEMENTS


def fused_sum(out: torch.Tensor, blocks: list[torch.Tensor], in_rank: torch.Tensor, biases=()) -> bool:
    """`out[t] = bf16(0 + Σ_j blocks[j][row of t] (if in_rank[t, j]) + biases[t])` in one compiled pass, where
    `blocks[j]` holds the copies of the tokens with `in_rank[:, j]`, in token order; False (and `out` untouched or
    to be overwritten) when the eager path should run instead."""
    variant = (len(blocks), len(biases))
    if not _wanted(out, blocks) or not SUM.usable(variant):
        return False
    blocks = [b if b.shape[0] else b.new_zeros(_DUMMY_ROWS, out.shape[1]) for b in blocks]
    return SUM(variant, out, blocks, copy_index(in_rank), list(biases))


def _one_tensor(blocks: list[torch.Tensor], scratch) -> torch.Tensor:
    """The blocks' rows as one tensor: a view when they are consecutive rows of one buffer (the socket and
    all_to_all wires receive into one), else copied into `scratch(rows)` (blocks in several shared windows)."""
    blocks = [b for b in blocks if b.shape[0]]
    first, n = blocks[0], sum(b.shape[0] for b in blocks)
    nxt = first.data_ptr()
    for b in blocks:
        if b.data_ptr() != nxt or b.stride() != first.stride() or not b.is_contiguous():
            return torch.cat(blocks, out=scratch(n))
        nxt += b.numel() * b.element_size()
    return first.as_strided((n, first.shape[1]), first.stride())


def fused_weighted_sum(out: torch.Tensor, blocks: list[torch.Tensor], index, weights, scratch) -> bool:
    """Low-latency combine's sum: `out[t] = bf16(0 + Σ_k fp32(row(t, k)) · weights[t, k])`, k ascending, each
    product rounded once, where `index()` gives `[T, K]` numbers of the blocks' rows end to end (-1: no row) (built
    only when the path runs); False when the eager path should run instead. `scratch(n)` gives a bf16 `[n, H]`
    buffer if the blocks must be joined."""
    k = weights.shape[1]
    if k == 0 or sum(b.shape[0] for b in blocks) == 0 or not _wanted(out, blocks) or not WEIGHTED.usable(k):
        return False
    return WEIGHTED(k, out, _one_tensor(blocks, scratch), index(), weights, k)
