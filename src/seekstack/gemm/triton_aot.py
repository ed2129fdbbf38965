"""Compile the Triton GEMM kernel for a CUDA architecture without a GPU (Triton ships ptxas).

A build check for machines without a GPU, and a way to fill Triton's cache ahead of time (DeepGEMM's most common
deployment complaint is first-call JIT cost). Needs `TRITON_INTERPRET=0` (or unset) before seekstack is imported.

>>> kernel = compile_for(90, layout="dense")  # doctest: +SKIP
>>> "wgmma" in kernel.asm["ptx"]  # doctest: +SKIP
True
"""

from __future__ import annotations

import inspect

_LAYOUTS = {"dense": 0, "contiguous": 1, "masked": 2}


def compile_for(
    capability: int,
    *,
    layout: str = "dense",
    fp8: bool = True,
    b_gran: int = 128,
    has_c: bool = False,
    out_dtype: str = "bf16",
    block_m: int = 128,
    num_stages: int = 3,
):
    """Compile one specialisation of `_gemm_kernel` for `sm_<capability>`; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_gemm

    if triton_gemm.interpreting():
        raise ValueError("TRITON_INTERPRET: set it to 0 before importing seekstack to compile for a GPU")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(_LAYOUTS)}, got {layout!r}")
    if fp8:
        upcast = 0 if capability >= 89 else 1
        operand = "*fp8e4nv" if upcast == 0 else "*i8"
    else:
        upcast, operand = 0, "*bf16"
    constexprs = dict(
        LAYOUT=_LAYOUTS[layout],
        SCALED=fp8,
        B_GRAN=b_gran,
        HAS_C=has_c,
        UPCAST=upcast,
        ROUND_BF16=False,
        BLOCK_M=block_m,
        BLOCK_N=128,
        BLOCK_K=128,
        GROUP_M=8,
    )
    pointers = {"a_ptr": operand, "b_ptr": operand, "d_ptr": f"*{out_dtype}", "c_ptr": "*fp32"}
    pointers.update(sa_ptr="*fp32", sb_ptr="*fp32", idx_ptr="*i32")
    signature = {}
    for name in inspect.signature(triton_gemm._gemm_kernel.fn).parameters:
        signature[name] = "constexpr" if name in constexprs else pointers.get(name, "i32")
    source = ASTSource(fn=triton_gemm._gemm_kernel, signature=signature, constexprs=constexprs)
    options = dict(num_warps=8 if block_m == 128 else 4, num_stages=num_stages)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
