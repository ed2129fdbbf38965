"""The oracle itself, checked against per-row arithmetic in float64 on tiny odd shapes."""

from __future__ import annotations

import math

import pytest
import torch

from seekstack.mla import mla_decode_reference
from seekstack.mla.testing import make_case


def naive(case, scale, causal):
    """out/lse per (request, query token, head) with explicit loops, positions mapped through the block table."""
    q, cache, table, lens, dv = case.args()
    b, s_q, h_q, d = q.shape
    page, h_kv = cache.shape[1], cache.shape[2]
    out = torch.zeros(b, s_q, h_q, dv, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(lens[i])
        for s in range(s_q):
            last = n - s_q + s if causal else n - 1
            for h in range(h_q):
                kv = h // (h_q // h_kv)
                keys = [cache[int(table[i, j // page]), j % page, kv].double() for j in range(last + 1)]
                if not keys:
                    continue
                logits = torch.stack([q[i, s, h].double() @ k for k in keys]) * scale
                lse[i, h, s] = torch.logsumexp(logits, 0)
                weights = torch.softmax(logits, 0)
                out[i, s, h] = sum(w * k[:dv] for w, k in zip(weights, keys))
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,h_q,h_kv,d,dv,page", [(1, 2, 1, 24, 16, 3), (3, 4, 2, 40, 40, 5), (2, 6, 3, 19, 7, 1)])
def test_reference_matches_per_row_arithmetic(gen, causal, s_q, h_q, h_kv, d, dv, page):
    case = make_case(3, s_q, h_q, h_kv, 11, d=d, dv=dv, block_size=page, dtype=torch.float32, varlen=True,
                     zero_lengths=1, causal=causal, generator=gen)  # fmt: skip
    scale = 0.37
    out, lse = mla_decode_reference(*case.args(), softmax_scale=scale, causal=causal)
    want_out, want_lse = naive(case, scale, causal)
    torch.testing.assert_close(out.double(), want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-6, rtol=1e-6)


def test_empty_sequence_gives_zero_output_and_infinite_lse(gen):
    case = make_case(4, 2, 16, 1, 50, zero_lengths=2, generator=gen)
    out, lse = mla_decode_reference(*case.args())
    empty = case.cache_seqlens == 0
    assert empty.sum() == 2
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == math.inf)
    assert torch.all(lse[~empty].isfinite())


def test_lse_is_natural_log_with_default_scale(gen):
    """One cached token: lse is exactly q.k / sqrt(d) and the output is that token's V."""
    case = make_case(2, 1, 4, 1, 1, dtype=torch.float32, generator=gen)
    out, lse = mla_decode_reference(*case.args())
    q, cache, table = case.q, case.k_cache, case.block_table
    for i in range(2):
        k = cache[int(table[i, 0]), 0, 0]
        torch.testing.assert_close(lse[i, :, 0], q[i, 0] @ k / math.sqrt(576))
        torch.testing.assert_close(out[i, 0], k[:512].expand(4, 512))


def test_causal_is_bottom_right_aligned(gen):
    """With s_q = s_k every query token sees itself and the earlier ones: the first sees exactly one key."""
    case = make_case(1, 4, 2, 1, 4, dtype=torch.float32, generator=gen)
    out, lse = mla_decode_reference(*case.args(), causal=True)
    first_key = case.k_cache[int(case.block_table[0, 0]), 0, 0]
    torch.testing.assert_close(out[0, 0], first_key[:512].expand(2, 512))
    plain, _ = mla_decode_reference(*case.args(), causal=False)
    torch.testing.assert_close(out[0, 3], plain[0, 3])  # the last token sees every key either way
