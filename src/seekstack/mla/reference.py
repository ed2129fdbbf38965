"""Plain fp32 PyTorch MLA decoding, one request at a time: the tests' oracle.

It follows FlashMLA's own test reference (`tests/test_flash_mla_dense_decoding.py::reference_torch`) and is written to
be obviously correct, not fast: gather the request's blocks through the block table, flatten, trim to its length,
softmax in fp32 (query head h reads KV head h // (h_q / h_kv)), and O = P @ V with V the first `head_dim_v` columns
of K.
"""

from __future__ import annotations

import math

import torch

from seekstack.mla.fp8_cache import unpack_fp8_kvcache


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, s_q, h_q, dv] in q's dtype, lse fp32 [b, h_q, s_q]); same arguments as `flash_mla_with_kvcache`."""
    b, s_q, h_q, d = q.shape
    if is_fp8_kvcache:
        k_cache = unpack_fp8_kvcache(k_cache, d, head_dim_v)
    num_blocks, page, h_kv, _ = k_cache.shape
    group = h_q // h_kv
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    slots = k_cache.reshape(num_blocks * page, h_kv, d)

    out = torch.zeros(b, s_q, h_q, head_dim_v, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32, device=q.device)
    for i in range(b):
        qi = q[i].float().view(s_q, h_kv, group, d)  # query head h reads KV head h // group
        if indices is None:
            n = int(cache_seqlens[i])
            blocks = block_table[i, : math.ceil(n / page)].long()
            kv = k_cache[blocks].reshape(-1, h_kv, d)[:n].float()  # [n, h_kv, d]
            scores = torch.einsum("skgd,nkd->kgsn", qi, kv) * scale  # [h_kv, group, s_q, n]
            if causal and s_q > 1:
                # bottom-right aligned: query i sees keys [0, n - s_q + i]
                allowed = torch.ones(s_q, n, dtype=torch.bool, device=q.device).tril(diagonal=n - s_q)
                scores = scores.masked_fill(~allowed, float("-inf"))
            equation = "kgsn,nkd->skgd"
        else:
            idx = indices[i].long()  # [s_q, topk]; -1 marks an invalid entry
            kv = slots[idx.clamp_min(0)].float()  # [s_q, topk, h_kv, d]
            kv = kv.masked_fill((idx < 0)[..., None, None], 0.0)  # skipped slots may hold anything, even NaN
            scores = torch.einsum("skgd,stkd->kgst", qi, kv) * scale  # [h_kv, group, s_q, topk]
            scores = scores.masked_fill(idx < 0, float("-inf"))
            equation = "kgst,stkd->skgd"
        row_lse = torch.logsumexp(scores, dim=-1)  # [h_kv, group, s_q]
        lonely = row_lse == float("-inf")  # no attendable key: out = 0, lse = +inf
        probs = torch.exp(scores - row_lse.masked_fill(lonely, float("inf")).unsqueeze(-1))
        out[i] = torch.einsum(equation, probs, kv[..., :head_dim_v]).reshape(s_q, h_q, head_dim_v)
        lse[i] = row_lse.masked_fill(lonely, float("inf")).reshape(h_q, s_q)
    return out.to(q.dtype), lse
