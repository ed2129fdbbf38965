"""Compile the MLA Triton kernels ahead of time for CUDA targets, without a GPU (ptxas ships with triton).

Run as a script (test_triton_compile.py does): TRITON_INTERPRET must be 0 here, so it cannot share a process with
the interpreted tests. Prints one JSON line per kernel: target, config, shared memory, registers and stack (spills).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from seekstack.mla import triton_decode as td  # noqa: E402

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def resources(compiled) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]), "shared": compiled.metadata.shared}


def splitkv(cap, block_m, block_n, warps, stages, dtype="bf16", fp8=False, sparse=False, upcast=False, bits=False):
    kernel = td._splitkv_kernel
    ptrs = dict(Q=PTR[dtype], K=("*u8" if bits else "*fp8e4nv") if fp8 else PTR[dtype],
                KScale="*fp32" if fp8 else PTR[dtype], KRope="*bf16" if fp8 else PTR[dtype], Out=PTR[dtype],
                Lse="*fp32", OAccum="*fp32", LseAccum="*fp32", BlockTable="*i32", SeqLens="*i32", Indices="*i32",
                SchedMeta="*i32", NumSplits="*i32")  # fmt: skip
    consts = dict(PAGE=64, BLOCK_M=block_m, BLOCK_N=block_n, D1=512, D2=64, SPLIT=512, DV=512, SPARSE=sparse,
                  CAUSAL=not sparse, FP8=fp8, UPCAST=upcast, EXACT_BF16=False,
                  PRECISION="ieee" if upcast else "tf32", FP8_FROM_BITS=bits)  # fmt: skip
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else "fp32" if n == "sm_scale_log2" else "i32")
           for n in kernel.arg_names}  # fmt: skip
    src = ASTSource(kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=dict(num_warps=warps, num_stages=stages))


def combine(cap, dtype="bf16"):
    kernel = td._combine_kernel
    consts = dict(BLOCK_M=16, D1=512, DV=512, EXACT_BF16=False)
    ptrs = dict(OAccum="*fp32", LseAccum="*fp32", Lse="*fp32", NumSplits="*i32", Out=PTR[dtype])
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else "i32") for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=4))  # fmt: skip


def main(which: list[str]) -> None:
    cases = {
        "sm90-h128": lambda: splitkv(90, *td._configs(128, False)[0]),
        "sm90-h16": lambda: splitkv(90, *td._configs(16, False)[0]),
        "sm90-fp8-sparse": lambda: splitkv(90, *td._configs(128, False)[0], fp8=True, sparse=True),
        "sm80-h128": lambda: splitkv(80, *td._configs(128, False)[0]),
        "sm80-fp8-bits": lambda: splitkv(80, *td._configs(128, False)[0], fp8=True, bits=True),
        "sm86-fallback": lambda: splitkv(86, *td._configs(128, False)[-1]),
        "sm80-fp32": lambda: splitkv(80, *td._configs(128, True)[0], dtype="fp32", upcast=True),
        "sm90-combine": lambda: combine(90),
    }
    for name in which or list(cases):
        print(json.dumps({"case": name, **resources(cases[name]())}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
