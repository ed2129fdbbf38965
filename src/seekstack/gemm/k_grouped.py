"""K-grouped GEMMs (MoE weight gradients): one `[m, n]` result per group, each group with its own K (its tokens).

>>> from seekstack.gemm import per_channel_cast_to_fp8, calc_diff
>>> ks = [256, 0, 130]
>>> grads, acts = [torch.randn(k, 64) for k in ks], [torch.randn(k, 96) for k in ks]
>>> qa, qb = [per_channel_cast_to_fp8(x) for x in grads], [per_channel_cast_to_fp8(x) for x in acts]
>>> a = (torch.cat([q for q, _ in qa]), torch.cat([s for _, s in qa]))
>>> b = (torch.cat([q for q, _ in qb]), torch.cat([s for _, s in qb]))
>>> d = torch.empty(3, 64, 96)
>>> k_grouped_fp8_gemm_tn_contiguous(a, b, d, ks)
>>> calc_diff(d[0], grads[0].T @ acts[0]) < 1e-3, bool((d[1] == 0).all())
(True, True)
"""

from __future__ import annotations

import torch

from .casting import FP8_DTYPE
from .checks import FP32, check_c, check_same_device, check_scales, check_shape, check_tensor, split_pair
from .dispatch import pick_backend
from .layout import ceil_div


def _check_batch_sizes(name: str, sizes) -> list[int]:
    try:
        ks = [int(k) for k in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of ints, got {sizes!r}") from None
    if any(k < 0 for k in ks):
        raise ValueError(f"{name}: sizes must be >= 0, got {ks}")
    return ks


def _sf_rows_major(name: str, sf, rows: int, kb_total: int) -> torch.Tensor:
    """K-grouped scales as `[sum(kb), rows]` (DeepGEMM's documented shape); the transpose is accepted too."""
    if isinstance(sf, torch.Tensor) and sf.dim() == 2 and tuple(sf.shape) == (rows, kb_total) and rows != kb_total:
        sf = sf.T
    return check_scales(name, sf, (kb_total, rows))


def k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, batch_sizes, *, backend: str | None = None) -> None:
    """DeepGEMM V1 K-grouped wgrad: `out[g] += A_g @ B_g.T` for groups with their own K = `batch_sizes[g]`.

    lhs is `(flat fp8 [sum(m*k_g)], sf [sum(ceil(k_g/128)), m])`, each group's A a row-major `[m, k_g]` block;
    rhs likewise with n; `out` is fp32 `[G, m, n]` and is accumulated into.
    """
    a, sfa = split_pair("lhs", lhs)
    b, sfb = split_pair("rhs", rhs)
    check_tensor("out", out, (FP32,), 3)
    g, m, n = out.shape
    ks = _check_batch_sizes("batch_sizes", batch_sizes)
    if len(ks) != g:
        raise ValueError(f"batch_sizes: has {len(ks)} groups, out has {g}")
    check_tensor("lhs", a, (FP8_DTYPE,), a.dim())
    check_tensor("rhs", b, (FP8_DTYPE,), b.dim())
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() != m * sum(ks):
        raise ValueError(f"lhs: expected {m * sum(ks)} elements (m * sum(batch_sizes)), got {a.numel()}")
    if b.numel() != n * sum(ks):
        raise ValueError(f"rhs: expected {n * sum(ks)} elements (n * sum(batch_sizes)), got {b.numel()}")
    kbs = [ceil_div(k, 128) for k in ks]
    sfa = _sf_rows_major("lhs scales", sfa, m, sum(kbs))
    sfb = _sf_rows_major("rhs scales", sfb, n, sum(kbs))
    check_same_device(lhs=a, rhs=b, out=out)
    mod = pick_backend(out.device, backend)
    ao = bo = so = 0
    for i, (k, kb) in enumerate(zip(ks, kbs)):
        if k:
            ag, bg = a[ao : ao + m * k].view(m, k), b[bo : bo + n * k].view(n, k)
            mod.gemm(ag, sfa[so : so + kb].T, bg, sfb[so : so + kb].T, 1, out[i], out[i])
        ao, bo, so = ao + m * k, bo + n * k, so + kb


def k_grouped_fp8_gemm_tn_contiguous(
    a, b, d, ks, ks_tensor=None, c=None, recipe=(1, 1, 128), compiled_dims: str = "mn", *, backend: str | None = None
) -> None:
    """K-grouped TN GEMM (MoE wgrad in the token-major layout): `d[g] = c[g] + a_g.T @ b_g`.

    `a = (fp8 [sum(ks), m], sf [sum(ceil(k_g/128)), m])` and `b = (fp8 [sum(ks), n], sf [..., n])`: each group's
    rows are its tokens, quantised with 128x1 scales per group (`per_channel_cast_to_fp8` on each group's slice).
    `ks_tensor` (DeepGEMM's device copy of `ks`) is accepted and ignored.
    """
    a_, sfa = split_pair("a", a)
    b_, sfb = split_pair("b", b)
    if recipe is not None and tuple(recipe) != (1, 1, 128):
        raise ValueError(f"recipe: the K-grouped GEMM takes (1, 1, 128), got {recipe!r}")
    check_tensor("a", a_, (FP8_DTYPE,), 2)
    check_tensor("b", b_, (FP8_DTYPE,), 2)
    check_tensor("d", d, (FP32,), 3)
    g, m, n = d.shape
    ks_ = _check_batch_sizes("ks", ks)
    if len(ks_) != g:
        raise ValueError(f"ks: has {len(ks_)} groups, d has {g}")
    check_shape("a", a_, (sum(ks_), m))
    check_shape("b", b_, (sum(ks_), n))
    kbs = [ceil_div(k, 128) for k in ks_]
    sfa = check_scales("a scales", sfa, (sum(kbs), m))
    sfb = check_scales("b scales", sfb, (sum(kbs), n))
    check_c("c", c, (g, m, n))
    check_same_device(a=a_, b=b_, d=d, c=c)
    mod = pick_backend(d.device, backend)
    ko = so = 0
    for i, (k, kb) in enumerate(zip(ks_, kbs)):
        ci = None if c is None else c[i]
        if k:
            mod.gemm(a_[ko : ko + k].T, sfa[so : so + kb].T, b_[ko : ko + k].T, sfb[so : so + kb].T, 1, d[i], ci)
        elif ci is not None:
            d[i].copy_(ci)
        else:
            d[i].zero_()
        ko, so = ko + k, so + kb
