"""MLA decoding over a paged latent KV cache: FlashMLA's API on every device.

FlashMLA (deepseek-ai/FlashMLA) decodes Multi-head Latent Attention as MQA over one latent KV head (d = 576:
512 latent values that double as V, plus 64 RoPE values) on Hopper only, with 64-token pages. This package offers the
same interface with an exact fp32 path on CPU, Triton split-KV + combine kernels on CUDA, any page size, head dims,
head counts, fp16/bf16/fp32, any s_q, the 656-byte FP8 cache layout and sparse (top-k) decoding.

>>> import torch
>>> from seekstack.mla import flash_mla_with_kvcache, get_mla_metadata
>>> from seekstack.mla.testing import make_case
>>> case = make_case(b=2, s_q=1, h_q=16, h_kv=1, s_k=100)
>>> meta, splits = get_mla_metadata(case.cache_seqlens, 1 * 16 // 1, 1)
>>> out, lse = flash_mla_with_kvcache(*case.args(), meta, splits, causal=True)
>>> out.shape, lse.shape
(torch.Size([2, 1, 16, 512]), torch.Size([2, 16, 1]))
"""

from seekstack.mla.fp8_cache import fp8_bytes_per_token, pack_fp8_kvcache, unpack_fp8_kvcache
from seekstack.mla.interface import flash_mla_with_kvcache
from seekstack.mla.metadata import get_mla_metadata
from seekstack.mla.reference import mla_decode_reference

__all__ = [
    "flash_mla_with_kvcache",
    "fp8_bytes_per_token",
    "get_mla_metadata",
    "mla_decode_reference",
    "pack_fp8_kvcache",
    "unpack_fp8_kvcache",
]
