"""FlashMLA's test recipe as library code, shared by the tests, the demo and the benchmark.

`make_case` builds a decoding problem the way FlashMLA's tests do: q and the cache are `randn / 10` clamped to
[-1, 1]; lengths are constant or drawn from Normal(s_k, s_k / 2) (at least s_q); the block table is a random
permutation; every unused block, and every slot past a request's length, is NaN, and unused block-table entries are
2147480000, so any out-of-range read poisons the result. `check_close` is FlashMLA's `check_is_allclose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seekstack.mla.fp8_cache import pack_fp8_kvcache

UNUSED_BLOCK_ID = 2147480000
OUT_TOL = dict(abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_diff_tol=1e-7)


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    head_dim_v: int
    causal: bool = False
    is_fp8_kvcache: bool = False
    indices: torch.Tensor | None = None

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.block_table, self.cache_seqlens, self.head_dim_v)

    def kwargs(self) -> dict:
        return dict(causal=self.causal, is_fp8_kvcache=self.is_fp8_kvcache, indices=self.indices)

    @property
    def kv_bytes(self) -> int:
        """Bytes of cache actually attended (each used token once), for the benchmark's byte count."""
        per_token = self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        if self.indices is not None:
            return int(torch.unique(self.indices[self.indices >= 0]).numel()) * per_token
        return int(self.cache_seqlens.sum()) * per_token


def make_case(
    b: int,
    s_q: int,
    h_q: int,
    h_kv: int,
    s_k: int,
    *,
    d: int = 576,
    dv: int = 512,
    block_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    varlen: bool = False,
    zero_lengths: int = 0,
    causal: bool = False,
    fp8: bool = False,
    topk: int | None = None,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    poison: bool = True,
) -> Case:
    """A random decoding problem; `topk` makes it sparse (indices of cache slots, some -1)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) / 10).clamp_(-1, 1)

    if varlen:
        seqlens = torch.normal(float(s_k), s_k / 2, (b,), generator=gen).round().clamp_min(s_q).long()
    else:
        seqlens = torch.full((b,), s_k, dtype=torch.long)
    if zero_lengths:
        seqlens[torch.randperm(b, generator=gen)[:zero_lengths]] = 0
    max_pad = max(1, math.ceil(int(seqlens.max()) / 256) * 256)
    blocks_per_seq = math.ceil(max_pad / block_size)
    num_blocks = b * blocks_per_seq
    block_table = torch.randperm(num_blocks, generator=gen).view(b, blocks_per_seq)

    cache = randn(num_blocks, block_size, h_kv, d)
    if poison:
        used_blocks = (seqlens + block_size - 1) // block_size
        for i in range(b):
            n, used = int(seqlens[i]), int(used_blocks[i])
            cache[block_table[i, used:]] = float("nan")
            if n % block_size:
                cache[block_table[i, used - 1], n % block_size :] = float("nan")
            block_table[i, used:] = UNUSED_BLOCK_ID

    indices = None
    if topk is not None:
        indices = torch.full((b, s_q, topk), -1, dtype=torch.long)
        for i in range(b):
            n = int(seqlens[i])
            for s in range(s_q):
                pos = torch.randperm(n, generator=gen)[:topk]
                pos = pos[torch.rand(pos.numel(), generator=gen) > 0.1]  # some entries stay -1
                slots = block_table[i, pos // block_size] * block_size + pos % block_size
                indices[i, s, : slots.numel()] = slots
            indices[i] = indices[i, :, torch.randperm(topk, generator=gen)]  # -1s anywhere, not just at the end
        indices = indices.to(torch.int32).to(device)
        causal = False

    k_cache = pack_fp8_kvcache(cache.to(dtype), head_dim_v=dv) if fp8 else cache.to(dtype)
    return Case(
        q=randn(b, s_q, h_q, d).to(dtype).to(device),
        k_cache=k_cache.to(device),
        block_table=block_table.to(torch.int32).to(device),
        cache_seqlens=seqlens.to(torch.int32).to(device),
        head_dim_v=dv,
        causal=causal,
        is_fp8_kvcache=fp8,
        indices=indices,
    )


def check_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    abs_tol: float,
    rel_tol: float,
    cos_diff_tol: float,
) -> None:
    """FlashMLA's `check_is_allclose`: same inf/NaN positions; each element within abs_tol OR rel_tol; and the
    cosine difference 1 - 2*sum(xy) / sum(x^2 + y^2) at most cos_diff_tol. Raises AssertionError with details."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    for what, fa, fe in (
        ("NaN", a.isnan(), e.isnan()),
        ("+inf", a == math.inf, e == math.inf),
        ("-inf", a == -math.inf, e == -math.inf),
    ):
        if not torch.equal(fa, fe):
            raise AssertionError(f"{name}: {what} positions differ ({int(fa.sum())} vs {int(fe.sum())} expected)")
    finite = a.isfinite()
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    abs_err = (a - e).abs()
    rel_err = abs_err / e.abs().clamp_min(1e-30)
    bad = (abs_err > abs_tol) & (rel_err > rel_tol)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off, e.g. {float(a[k])!r} vs {float(e[k])!r} "
            f"(abs {float(abs_err[k]):.3g} > {abs_tol}, rel {float(rel_err[k]):.3g} > {rel_tol:.4g})"
        )
    denom = float((a * a + e * e).sum())
    cos_diff = 1 - 2 * float((a * e).sum()) / denom if denom > 0 else 0.0
    if cos_diff > cos_diff_tol:
        raise AssertionError(f"{name}: cosine difference {cos_diff:.3g} > {cos_diff_tol}")


def check_decode(out, lse, out_ref, lse_ref) -> None:
    check_close("out", out, out_ref, **OUT_TOL)
    check_close("lse", lse, lse_ref, **LSE_TOL)


# FlashMLA's test grid: (s_q, causal, h_q, h_kv, block size), each on 4 varlen requests of ~140 keys, one of length 0.
RECIPE = [
    (s_q, causal, h_q, h_kv, block)
    for s_q in (1, 2, 4)
    for causal in (False, True)
    for h_q, h_kv in ((1, 1), (16, 1), (16, 2), (128, 1), (128, 2))
    for block in (1, 16, 64)
]


def recipe_case(gen: torch.Generator, s_q: int, causal: bool, h_q: int, h_kv: int, block_size: int) -> Case:
    """One case of `RECIPE`."""
    return make_case(4, s_q, h_q, h_kv, 140, block_size=block_size, varlen=True, zero_lengths=1, causal=causal,
                     generator=gen)  # fmt: skip
