"""MoE grouped GEMMs under DeepGEMM's names: the M-grouped contiguous and masked layouts.

- Contiguous (MoE forward/prefill): A `[m_sum, k]` holds every expert's tokens back to back, B `[G, n, k]`,
  `m_indices [m_sum]` gives each row's group, -1 for padding rows, whose output is zero. DeepGEMM pads each group
  to `get_m_alignment_for_contiguous_layout()` (128) rows; here any segmentation works.
- Masked (MoE decode; DeepEP's low-latency layout): A `[G, m_max, k]`, `masked_m [G]` valid rows per group; only
  `out[g, :masked_m[g]]` is written, the rest is left untouched.

>>> from seekstack.gemm import per_token_cast_to_fp8, per_block_cast_to_fp8
>>> x, w = torch.randn(2, 8, 256), torch.randn(2, 64, 256)
>>> out = torch.full((2, 8, 64), float("nan"), dtype=torch.bfloat16)
>>> masked_m = torch.tensor([3, 0], dtype=torch.int32)
>>> m_grouped_gemm_fp8_fp8_bf16_nt_masked(per_token_cast_to_fp8(x), per_block_cast_to_fp8(w), out, masked_m, 2)
>>> bool(out[0, :3].isfinite().all()), bool(out[0, 3:].isnan().all() and out[1].isnan().all())
(True, True)
"""

from __future__ import annotations

import torch

from .casting import FP8_DTYPE
from .checks import (
    BF16,
    FP32,
    b_granularity,
    check_index,
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


def _check_grouped(names, a, sfa, b, sfb, d, a_lead: tuple[int, ...], quantized: bool, recipe=None):
    """Checks shared by the contiguous (`a_lead` = ()) and masked (`a_lead` = (G,)) layouts."""
    nl, nr, no = names
    dt = (FP8_DTYPE,) if quantized else (BF16,)
    check_tensor(nl, a, dt, 2 + len(a_lead))
    check_tensor(nr, b, dt, 3)
    g, n, k_b = b.shape
    k = a.shape[-1]
    check_k(nr, k_b, k)
    if a_lead and a.shape[0] != g:
        raise ValueError(f"{nl}: has {a.shape[0]} groups, {nr} has {g}")
    m = a.shape[-2]
    check_tensor(no, d, (BF16, FP32) if not quantized or names[0] == "a" else (BF16,), 2 + len(a_lead))
    check_shape(no, d, (*a.shape[:-1], n))
    gran = 128
    if quantized:
        kb = ceil_div(k, 128)
        sfa = check_scales(f"{nl} scales", sfa, (*a_lead, m, kb))
        gran = b_granularity(f"{nr} scales", sfb, n, kb, recipe, batch=(g,))
        sfb = check_scales(f"{nr} scales", sfb, (g, ceil_div(n, gran), kb))
    check_same_device(**{nl: a, nr: b, no: d})
    return sfa, sfb, gran


def _contiguous(mod, a, sfa, b, sfb, gran, d, m_indices):
    if hasattr(mod, "m_grouped_contiguous"):
        return mod.m_grouped_contiguous(a, sfa, b, sfb, gran, d, m_indices)
    # Walk runs of equal group ids: one GEMM per run (one per group in DeepGEMM's layout).
    ids, counts = torch.unique_consecutive(m_indices.cpu(), return_counts=True)
    start = 0
    for gid, cnt in zip(ids.tolist(), counts.tolist()):
        rows = slice(start, start + cnt)
        if gid < 0:
            d[rows].zero_()
        else:
            mod.gemm(
                a[rows],
                None if sfa is None else sfa[rows],
                b[gid],
                None if sfb is None else sfb[gid],
                gran,
                d[rows],
                None,
            )
        start += cnt


def _masked(mod, a, sfa, b, sfb, gran, d, masked_m):
    if hasattr(mod, "m_grouped_masked"):
        return mod.m_grouped_masked(a, sfa, b, sfb, gran, d, masked_m)
    for g, mm in enumerate(masked_m.tolist()):
        if mm > 0:
            mod.gemm(
                a[g, :mm],
                None if sfa is None else sfa[g, :mm],
                b[g],
                None if sfb is None else sfb[g],
                gran,
                d[g, :mm],
                None,
            )


def _check_m_indices(name, m_indices, m, g, device):
    check_index(name, m_indices)
    check_shape(name, m_indices, (m,))
    if m_indices.device != device:
        raise ValueError(f"{name}: on {m_indices.device}, operands on {device}")
    if m_indices.device.type == "cpu" and m and (int(m_indices.min()) < -1 or int(m_indices.max()) >= g):
        raise ValueError(
            f"{name}: group ids must lie in [-1, {g}), got [{int(m_indices.min())}, {int(m_indices.max())}]"
        )


def _check_masked_m(name, masked_m, g, m_max, expected_m, device):
    check_index(name, masked_m)
    check_shape(name, masked_m, (g,))
    if masked_m.device != device:
        raise ValueError(f"{name}: on {masked_m.device}, operands on {device}")
    if masked_m.device.type == "cpu" and g and (int(masked_m.min()) < 0 or int(masked_m.max()) > m_max):
        raise ValueError(f"{name}: counts must lie in [0, {m_max}], got {masked_m.tolist()}")
    if not isinstance(expected_m, int) or isinstance(expected_m, bool) or expected_m < 0:
        raise ValueError(f"expected_m: expected a non-negative int hint, got {expected_m!r}")


def m_grouped_fp8_gemm_nt_contiguous(
    a,
    b,
    d,
    grouped_layout,
    recipe=None,
    recipe_a=None,
    recipe_b=None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
    use_psum_layout: bool = False,
    *,
    backend: str | None = None,
) -> None:
    """Contiguous grouped FP8 GEMM: `d[i] = a[i] @ b[grouped_layout[i]].T`, zero where `grouped_layout[i] == -1`.

    `grouped_layout` is DeepGEMM's current name for V1's `m_indices` (int32 [m_sum]).
    """
    if use_psum_layout:
        raise ValueError("use_psum_layout: only the per-row group-id layout is supported")
    a_, sfa = split_pair("a", a)
    b_, sfb = split_pair("b", b)
    recipe = resolve_recipe(recipe, recipe_a, recipe_b)
    sfa, sfb, gran = _check_grouped(("a", "b", "d"), a_, sfa, b_, sfb, d, (), True, recipe)
    _check_m_indices("grouped_layout", grouped_layout, a_.shape[0], b_.shape[0], d.device)
    _contiguous(pick_backend(d.device, backend), a_, sfa, b_, sfb, gran, d, grouped_layout)


def m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, *, backend: str | None = None) -> None:
    """DeepGEMM V1 contiguous grouped GEMM: lhs `([m_sum, k], [m_sum, kb])`, rhs `([G, n, k], [G, nb, kb])`."""
    a, sfa = split_pair("lhs", lhs)
    b, sfb = split_pair("rhs", rhs)
    sfa, sfb, gran = _check_grouped(("lhs", "rhs", "out"), a, sfa, b, sfb, out, (), True, (1, 128, 128))
    _check_m_indices("m_indices", m_indices, a.shape[0], b.shape[0], out.device)
    _contiguous(pick_backend(out.device, backend), a, sfa, b, sfb, gran, out, m_indices)


def m_grouped_fp8_gemm_nt_masked(
    a,
    b,
    d,
    masked_m,
    expected_m,
    recipe=None,
    recipe_a=None,
    recipe_b=None,
    compiled_dims: str = "nk",
    disable_ue8m0_cast: bool = False,
    *,
    backend: str | None = None,
) -> None:
    """Masked grouped FP8 GEMM: `d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T`; other rows untouched."""
    a_, sfa = split_pair("a", a)
    b_, sfb = split_pair("b", b)
    recipe = resolve_recipe(recipe, recipe_a, recipe_b)
    sfa, sfb, gran = _check_grouped(("a", "b", "d"), a_, sfa, b_, sfb, d, (b_.shape[0],), True, recipe)
    _check_masked_m("masked_m", masked_m, b_.shape[0], a_.shape[1], expected_m, d.device)
    _masked(pick_backend(d.device, backend), a_, sfa, b_, sfb, gran, d, masked_m)


def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m, *, backend: str | None = None) -> None:
    """DeepGEMM V1 masked grouped GEMM: lhs `([G, m_max, k], [G, m_max, kb])`, rhs `([G, n, k], [G, nb, kb])`.

    `expected_m` is a scheduling hint (the typical `masked_m`); it does not change the result.
    """
    a, sfa = split_pair("lhs", lhs)
    b, sfb = split_pair("rhs", rhs)
    sfa, sfb, gran = _check_grouped(("lhs", "rhs", "out"), a, sfa, b, sfb, out, (b.shape[0],), True, (1, 128, 128))
    _check_masked_m("masked_m", masked_m, b.shape[0], a.shape[1], expected_m, out.device)
    _masked(pick_backend(out.device, backend), a, sfa, b, sfb, gran, out, masked_m)


def m_grouped_bf16_gemm_nt_contiguous(
    a, b, d, grouped_layout, compiled_dims: str = "nk", *, backend: str | None = None
) -> None:
    """Contiguous grouped bf16 GEMM (fp32 accumulation): `d[i] = a[i] @ b[grouped_layout[i]].T`, -1 rows zero."""
    _check_grouped(("a", "b", "d"), a, None, b, None, d, (), False)
    _check_m_indices("grouped_layout", grouped_layout, a.shape[0], b.shape[0], d.device)
    _contiguous(pick_backend(d.device, backend), a, None, b, None, 1, d, grouped_layout)


def m_grouped_bf16_gemm_nt_masked(
    a, b, d, masked_m, expected_m, compiled_dims: str = "nk", *, backend: str | None = None
) -> None:
    """Masked grouped bf16 GEMM: `d[g, :masked_m[g]] = a[g, :masked_m[g]] @ b[g].T`; other rows untouched."""
    _check_grouped(("a", "b", "d"), a, None, b, None, d, (b.shape[0],), False)
    _check_masked_m("masked_m", masked_m, b.shape[0], a.shape[1], expected_m, d.device)
    _masked(pick_backend(d.device, backend), a, None, b, None, 1, d, masked_m)
