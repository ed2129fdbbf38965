"""The compiled combine sum (`seekstack.ep.fused_sum`) against a plain fp32 loop, bit for bit, in one process."""

from __future__ import annotations

import shutil

import pytest
import torch

from seekstack.ep import fused_sum as fs

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="TorchInductor's CPU needs a C++ compiler"
)


def _case(gen: torch.Generator, T: int, H: int, R: int, p: float, empty: int | None = None):
    """Blocks as column slices of NaN-filled buffers (poisoned unused memory), values that often tie when summed."""
    in_rank = torch.rand(T, R, generator=gen) < p
    if empty is not None:
        in_rank[:, empty] = False
    blocks = []
    for j in range(R):
        n = int(in_rank[:, j].sum())
        parent = torch.full((n, H + 5), float("nan"), dtype=torch.bfloat16)
        vals = torch.randint(-512, 512, (n, H), generator=gen).float() / 64  # 8-bit values: fp32 sums tie often
        vals *= torch.exp2(torch.randint(-3, 4, (n, 1), generator=gen).float())
        vals[vals == 0] = -0.0  # signed zeros: the sum starts at +0.0, so a token of -0.0 copies gives +0.0
        vals[::3] = -0.0
        parent[:, :H] = vals.to(torch.bfloat16)
        blocks.append(parent[:, :H])
    return in_rank, blocks


def _reference(in_rank, blocks, biases, T, H):
    acc = torch.zeros(T, H)
    for j, b in enumerate(blocks):
        rows = iter(b)
        for t in range(T):
            if in_rank[t, j]:
                acc[t] += next(rows).float()
    for bias in biases:
        acc += bias.float()
    return acc.to(torch.bfloat16)


@needs_compiler
@pytest.mark.parametrize(
    "T, H, R, p, empty, nbias",
    [(37, 136, 4, 0.9, None, 0), (64, 2051, 3, 0.5, 1, 1), (5, 128, 2, 0.7, 0, 2), (129, 384, 8, 0.3, None, 1)],
)
def test_fused_sum_matches_fp32_loop_bitwise(seed, monkeypatch, T, H, R, p, empty, nbias):
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "always")
    gen = torch.Generator().manual_seed(seed)
    in_rank, blocks = _case(gen, T, H, R, p, empty)
    biases = [torch.randn(T, H, generator=gen).to(dt) for dt in (torch.bfloat16, torch.float32)][:nbias]
    for b in biases:
        b[::4] = -0.0  # +0.0 + -0.0 = +0.0 for tokens without copies
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    assert fs.fused_sum(out, blocks, in_rank, biases)
    want = _reference(in_rank, blocks, biases, T, H)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    if nbias == 0:
        none = ~in_rank.any(1)
        assert (out[none].view(torch.int16) == 0).all()  # +0.0 for tokens without copies


def test_fused_sum_declines_when_off_or_small(monkeypatch):
    in_rank, blocks = _case(torch.Generator().manual_seed(1), 16, 128, 2, 0.8)
    out = torch.empty(16, 128, dtype=torch.bfloat16)
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "off")
    assert not fs.fused_sum(out, blocks, in_rank)
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "auto")
    assert not fs.fused_sum(out, blocks, in_rank)  # far below MIN_ELEMENTS: the eager path is cheaper
    assert not fs.fused_sum(out.float(), [b.float() for b in blocks], in_rank)  # fp32 outputs stay eager


def test_copy_index():
    in_rank = torch.tensor([[1, 0], [0, 0], [1, 1], [1, 0]], dtype=torch.bool)
    assert fs.copy_index(in_rank).tolist() == [[0, -1], [-1, -1], [1, 0], [2, -1]]


@needs_compiler
@pytest.mark.parametrize("adjacent", [True, False])
def test_fused_weighted_sum_matches_fp32_loop_bitwise(seed, monkeypatch, adjacent):
    """Low-latency combine's sum: Σ_k fp32(row) · w in k order, each product rounded once (no FMA), -1 skipped."""
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "always")
    gen = torch.Generator().manual_seed(seed)
    T, K, H = 45, 6, 264
    index = torch.randperm(T * K, generator=gen).view(T, K)
    index[torch.rand(T, K, generator=gen) < 0.3] = -1
    index[4] = -1  # a token routed nowhere: +0.0
    n = T * K
    rows = (torch.randn(n, H, generator=gen) * torch.exp2(torch.randint(-8, 8, (n, 1), generator=gen))).bfloat16()
    rows[::4] = -0.0
    weights = torch.rand(T, K, generator=gen)
    cuts = [0, n // 3, n // 3, n]  # an empty block in the middle
    if adjacent:  # slices of one receive buffer, as on the socket wires: used in place
        blocks = [rows[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    else:  # rows in separate, NaN-padded buffers, as in the peers' windows: joined first
        blocks = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            parent = torch.full((b - a, H + 3), float("nan"), dtype=torch.bfloat16)
            parent[:, :H] = rows[a:b]
            blocks.append(parent[:, :H])
    joined = []

    def scratch(m: int) -> torch.Tensor:
        joined.append(torch.full((m, H), float("nan"), dtype=torch.bfloat16))
        return joined[-1]

    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    assert fs.fused_weighted_sum(out, blocks, lambda: index, weights, scratch)
    assert len(joined) == (0 if adjacent else 1)
    acc = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            if index[t, k] >= 0:
                acc[t] += rows[index[t, k]].float() * weights[t, k]
    assert torch.equal(out.view(torch.int16), acc.bfloat16().view(torch.int16))
