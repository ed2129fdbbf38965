"""The CPU path's C kernel (`cpu_decode.c`): bf16 queries over a paged bf16 or FP8 (V3.2 layout) cache, dense or
sparse (`indices`), on AVX-512 CPUs.

`decode(p)` returns None when the kernel does not apply (other dtypes, head dims that are not
multiples of 32 / 64, no AVX-512, no C compiler, `SEEKSTACK_CPU_COMPILE=off`); `mla_decode_cpu` then runs its
vectorised PyTorch steps. Both are checked against the fp32 reference with FlashMLA's tolerances in the tests.

>>> # from seekstack.mla.interface import validate
>>> # out_lse = decode(validate(q, k_cache, block_table, cache_seqlens, 512))  -> (out, lse) or None
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from seekstack.cpu_native import NativeLibrary
from seekstack.mla.interface import DecodeProblem

LIBRARY = NativeLibrary(
    "mla_decode",
    Path(__file__).with_name("cpu_decode.c"),
    openmp=True,
    headers=(Path(__file__).parent.parent / "gemm" / "e4m3.h",),
)
_fn = None


def _function():
    global _fn
    lib = LIBRARY.load()
    if lib is None or not lib.seekstack_mla_supported():
        return None
    if _fn is None:
        fn = lib.seekstack_mla_decode
        fn.restype = ctypes.c_int
        i, p = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [p] * 6 + [i] * 11 + [ctypes.c_float, i, i, p, i, i, i]
        _fn = fn
    return _fn


def applies(p: DecodeProblem) -> bool:
    """Whether the kernel takes this problem (before asking for the library)."""
    return (
        p.q.device.type == "cpu"
        and p.q.dtype == torch.bfloat16
        and (p.is_fp8 or p.k_cache.dtype == torch.bfloat16)
        and p.d % 32 == 0
        and p.head_dim_v % 64 == 0
        and p.d <= 1024
        and p.k_cache.stride(3) == 1
    )


def available() -> bool:
    """Whether the C kernel runs on this machine (builds the library on the first call)."""
    return _function() is not None


def decode(p: DecodeProblem, split_keys: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [b, s_q, h_q, dv] bf16, lse fp32 [b, h_q, s_q]), or None when the kernel does not apply.

    `split_keys`: 0 lets the kernel cut long requests into pieces for its threads (split-KV, merged as FlashMLA's
    combine does); > 0 forces pieces of that many keys (rounded up to 16), whatever the thread count."""
    if not applies(p):
        return None
    fn = _function()
    if fn is None:
        return None
    q = p.q.contiguous()
    if p.sparse:  # slots instead of a block table and lengths
        indices = p.indices.to(torch.int32).contiguous()
        table = seqlens = torch.zeros(1, 1, dtype=torch.int32)
    else:
        indices = None
        table = p.block_table.to(torch.int32)
        if table.dim() != 2 or table.stride(1) != 1:
            table = table.contiguous()
        seqlens = p.cache_seqlens.to(torch.int32).contiguous()
    out = torch.empty(p.b, p.s_q, p.h_q, p.head_dim_v, dtype=torch.bfloat16)
    lse = torch.empty(p.b, p.h_q, p.s_q, dtype=torch.float32)
    k, e = p.k_cache, p.k_cache.element_size()  # strides go over in bytes
    rc = fn(
        q.data_ptr(), k.data_ptr(), table.data_ptr(), seqlens.data_ptr(), out.data_ptr(), lse.data_ptr(),
        p.b, p.s_q, p.h_q, p.h_kv, p.d, p.head_dim_v, p.page,
        k.stride(0) * e, k.stride(1) * e, k.stride(2) * e, table.stride(0),
        p.softmax_scale, int(p.causal), int(p.is_fp8),
        None if indices is None else indices.data_ptr(), 0 if indices is None else indices.shape[-1],
        split_keys, torch.get_num_threads(),
    )  # fmt: skip
    if rc == -1:
        return None  # sizes outside the kernel's range: the PyTorch path runs
    if rc != 0:
        raise MemoryError("seekstack.mla: the C kernel could not allocate its workspace")
    return out, lse
