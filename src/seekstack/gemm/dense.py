"""Dense GEMMs, `D = C + A @ B.T` ("NT": A is [m, k] row-major, B is stored [n, k]), under DeepGEMM's names.

FP8 operands come as `(tensor, scales)` pairs: A with 1x128 scales `[m, ceil(k/128)]`, B with 128x128 block scales
`[ceil(n/128), ceil(k/128)]` (or 1x128 scales `[n, ceil(k/128)]` for wgrad). Scales may be plain or in DeepGEMM's
TMA-aligned column-major layout. Any M, N and K work. Each function takes a keyword-only `backend`
("reference", "cpu", "triton"; see `dispatch.py`).

>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8, calc_diff
>>> x, w = torch.randn(64, 384, dtype=torch.bfloat16), torch.randn(200, 384, dtype=torch.bfloat16)
>>> out = torch.empty(64, 200, dtype=torch.bfloat16)
>>> gemm_fp8_fp8_bf16_nt(per_token_cast_to_fp8(x), per_block_cast_to_fp8(w), out)
>>> calc_diff(out, x.float() @ w.float().T) < 1e-3
True
"""

from __future__ import annotations

import torch

from .casting import FP8_DTYPE
from .checks import (
    BF16,
    FP32,
    b_granularity,
    check_c,
    check_k,
    check_same_device,
    check_scales,
    check_shape,
    check_tensor,
    resolve_recipe,
    split_pair,
)
from .dispatch import pick_backend
from .layout import ceil_div


def _check_fp8_nt(names, lhs, rhs, out, c, out_dtypes, recipe=None, b_gran=None):
    """Validated `(a, sfa, b, sfb, b_gran)` for a dense FP8 NT GEMM; `names` = (lhs, rhs, out, c) argument names."""
    nl, nr, no, nc = names
    a, sfa = split_pair(nl, lhs)
    b, sfb = split_pair(nr, rhs)
    check_tensor(nl, a, (FP8_DTYPE,), 2)
    check_tensor(nr, b, (FP8_DTYPE,), 2)
    (m, k), n = a.shape, b.shape[0]
    check_k(nr, b.shape[1], k)
    kb = ceil_div(k, 128)
    sfa = check_scales(f"{nl} scales", sfa, (m, kb))
    if b_gran is None:
        b_gran = b_granularity(f"{nr} scales", sfb, n, kb, recipe)
    sfb = check_scales(f"{nr} scales", sfb, (ceil_div(n, b_gran), kb))
    check_tensor(no, out, out_dtypes, 2)
    check_shape(no, out, (m, n))
    check_c(nc, c, (m, n))
    check_same_device(**{nl: a, f"{nl} scales": sfa, nr: b, f"{nr} scales": sfb, no: out, nc: c})
    return a, sfa, b, sfb, b_gran


def fp8_gemm_nt(
    a,
    b,
    d,
    c=None,
    recipe=None,
    recipe_a=None,
    recipe_b=None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
    *,
    backend: str | None = None,
) -> None:
    """`d = c + a @ b.T` with FP8 `a = (fp8 [m, k], sf [m, kb])`, `b = (fp8 [n, k], sf)`; `d` bf16 or fp32.

    `recipe` (1, 128, 128) means 128x128 B scales, (1, 1, 128) 1x128 B scales; None infers it from the scale shape
    (`recipe_a` (1, 128) with `recipe_b` (128, 128) or (1, 128) say the same per operand).
    `compiled_dims` and `disable_ue8m0_cast` are accepted for compatibility (there is no JIT to specialise).
    """
    a_, sfa, b_, sfb, gran = _check_fp8_nt(
        ("a", "b", "d", "c"), a, b, d, c, (BF16, FP32), resolve_recipe(recipe, recipe_a, recipe_b)
    )
    pick_backend(d.device, backend).gemm(a_, sfa, b_, sfb, gran, d, c)


def gemm_fp8_fp8_bf16_nt(lhs, rhs, out, *, backend: str | None = None) -> None:
    """DeepGEMM V1: `out = lhs @ rhs.T`, 1x128 LHS scales, 128x128 RHS block scales, bf16 `out [m, n]`."""
    a, sfa, b, sfb, gran = _check_fp8_nt(("lhs", "rhs", "out", "c"), lhs, rhs, out, None, (BF16,), b_gran=128)
    pick_backend(out.device, backend).gemm(a, sfa, b, sfb, gran, out, None)


def wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, *, backend: str | None = None) -> None:
    """DeepGEMM V1 weight-gradient GEMM: `out += lhs @ rhs.T` with 1x128 scales on both sides, fp32 `out`.

    >>> from seekstack.gemm import per_token_cast_to_fp8, calc_diff
    >>> g, x = torch.randn(64, 256), torch.randn(32, 256)
    >>> out = torch.ones(64, 32)
    >>> wgrad_gemm_fp8_fp8_fp32_nt(per_token_cast_to_fp8(g), per_token_cast_to_fp8(x), out)
    >>> calc_diff(out - 1, g @ x.T) < 1e-3
    True
    """
    a, sfa, b, sfb, gran = _check_fp8_nt(("lhs", "rhs", "out", "c"), lhs, rhs, out, None, (FP32,), b_gran=1)
    pick_backend(out.device, backend).gemm(a, sfa, b, sfb, gran, out, out)


def _check_bf16_nt(a, b, d, c):
    check_tensor("a", a, (BF16,), 2)
    check_tensor("b", b, (BF16,), 2)
    check_k("b", b.shape[1], a.shape[1])
    check_tensor("d", d, (BF16, FP32), 2)
    check_shape("d", d, (a.shape[0], b.shape[0]))
    check_c("c", c, (a.shape[0], b.shape[0]))
    check_same_device(a=a, b=b, d=d, c=c)


def bf16_gemm_nt(a, b, d, c=None, compiled_dims: str = "nk", *, backend: str | None = None) -> None:
    """`d = c + a @ b.T` with bf16 `a [m, k]`, `b [n, k]`, fp32 accumulation; `d` bf16 or fp32."""
    _check_bf16_nt(a, b, d, c)
    pick_backend(d.device, backend).gemm(a, None, b, None, 1, d, c)


def cublaslt_gemm_nt(a, b, d, c=None) -> None:
    """The vendor-library baseline DeepGEMM benchmarks against: `d = c + a @ b.T` through `torch.mm`."""
    _check_bf16_nt(a, b, d, c)
    acc = torch.mm(a, b.T) if d.dtype == a.dtype and c is None else torch.mm(a.float(), b.float().T)
    d.copy_(acc if c is None else acc.float() + c)
