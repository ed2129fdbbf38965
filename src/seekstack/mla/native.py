"""The CPU path's C kernel (`cpu_decode.c`): bf16, fp16 or fp32 queries over a paged cache of the same type or FP8
(V3.2 layout), dense or sparse (`indices`), on AVX-512 CPUs.

`decode(p)` returns None when the kernel does not apply (head dims that are not
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
    headers=(
        *(Path(__file__).with_name(f"cpu_{part}.h") for part in ("convert", "item", "blocks", "lanes")),
        Path(__file__).parent.parent / "gemm" / "e4m3.h",
    ),
)
_fn = None
_NO_TABLE = torch.zeros(1, 1, dtype=torch.int32)  # sparse decoding passes slots instead
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # q, out (and a non-FP8 cache)


def _function():
    global _fn
    lib = LIBRARY.load()
    if lib is None or _fn is False:
        return None
    if _fn is None:
        if not lib.seekstack_mla_supported():  # built without AVX-512: asked once
            _fn = False
            return None
        fn = lib.seekstack_mla_decode
        fn.restype = ctypes.c_int
        i, p = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [p] * 6 + [i] * 11 + [ctypes.c_float, i, i, p, i, i, i, i, i]
        _fn = fn
    return _fn


def applies(p: DecodeProblem) -> bool:
    """Whether the kernel takes this problem (before asking for the library)."""
    return (
        p.q.device.type == "cpu"
        and p.q.dtype in _DTYPE_CODES
        and (p.is_fp8 or p.k_cache.dtype == p.q.dtype)
        and p.d % 32 == 0
        and p.head_dim_v % 64 == 0
        and p.d <= 1024
        and p.k_cache.stride(3) == 1
    )


def available() -> bool:
    """Whether the C kernel runs on this machine (builds the library on the first call)."""
    return _function() is not None


def decode(
    p: DecodeProblem, split_keys: int = 0, rows_in_lanes: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [b, s_q, h_q, dv] in q's dtype, lse fp32 [b, h_q, s_q]), or None when the kernel does not apply.

    `split_keys`: 0 lets the kernel cut long requests into pieces for its threads (split-KV, merged as FlashMLA's
    combine does); > 0 forces pieces of that many keys (rounded up to 16), whatever the thread count.
    `rows_in_lanes`: work items hold up to 16 query rows (64 with an FP8 cache); None lets those of 13-16 rows (every
    item at h_q = 16 or 128) run with the rows in the lanes of one vector; True takes that path for any item of at
    most 16 rows, False never (the tests compare both)."""
    if not applies(p):
        return None
    fn = _function()
    if fn is None:
        return None
    # Per-call work here is ~10 us (a decode step at b = 16, s_k = 256 takes ~650): validated inputs are int32 and
    # mostly contiguous already, so they are only checked.
    q, k = p.q, p.k_cache
    b, s_q, h_q, d = q.shape
    if not q.is_contiguous():
        q = q.contiguous()
    if p.indices is not None:  # slots instead of a block table and lengths
        indices = p.indices if p.indices.is_contiguous() else p.indices.contiguous()
        table = seqlens = _NO_TABLE
        idx_ptr, topk = indices.data_ptr(), indices.shape[-1]
    else:
        table = p.block_table if p.block_table.stride(1) == 1 else p.block_table.contiguous()
        seqlens = p.cache_seqlens if p.cache_seqlens.is_contiguous() else p.cache_seqlens.contiguous()
        idx_ptr, topk = None, 0
    dv = p.head_dim_v
    out = torch.empty(b, s_q, h_q, dv, dtype=q.dtype)
    lse = torch.empty(b, h_q, s_q, dtype=torch.float32)
    e = k.element_size()  # strides go over in bytes
    ks = k.stride()
    rc = fn(
        q.data_ptr(), k.data_ptr(), table.data_ptr(), seqlens.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b, s_q, h_q, k.shape[2], d, dv, k.shape[1], ks[0] * e, ks[1] * e, ks[2] * e, table.stride(0),
        p.softmax_scale, int(p.causal), int(p.is_fp8), idx_ptr, topk, split_keys, _DTYPE_CODES[q.dtype],
        torch.get_num_threads(), -1 if rows_in_lanes is None else int(rows_in_lanes),
    )  # fmt: skip
    if rc == -1:
        return None  # sizes outside the kernel's range: the PyTorch path runs
    if rc != 0:
        raise MemoryError("seekstack.mla: the C kernel could not allocate its workspace")
    return out, lse
