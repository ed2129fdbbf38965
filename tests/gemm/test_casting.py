"""Quantisation helpers, layout helpers and calc_diff against plain-PyTorch definitions."""

from __future__ import annotations

import pytest
import torch

from seekstack.gemm import (
    calc_diff,
    ceil_to_ue8m0,
    get_col_major_tma_aligned_tensor,
    get_m_alignment_for_contiguous_layout,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_tensor,
    get_tma_aligned_size,
    pack_ue8m0_to_int,
    per_block_cast_to_fp8,
    per_channel_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0_from_int,
)
from seekstack.gemm.cpu import dequantize_rows
from seekstack.gemm.reference import dequantize

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("shape", [(1, 128), (7, 300), (130, 3884), (3, 5, 129)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_token_cast(seed, shape, ue8m0):
    x = torch.randn(shape, dtype=torch.bfloat16) * 3
    q, sf = per_token_cast_to_fp8(x, ue8m0)
    k = shape[-1]
    assert q.dtype == FP8 and q.shape == x.shape
    assert sf.dtype == torch.float32 and sf.shape == (*shape[:-1], -(-k // 128))
    # Scale definition: amax of each 1x128 slice / 448 (rounded up to a power of two for UE8M0).
    xp = torch.nn.functional.pad(x.float(), (0, sf.shape[-1] * 128 - k)).unflatten(-1, (-1, 128))
    want = xp.abs().amax(-1).clamp(min=1e-4) / 448
    if ue8m0:
        assert torch.equal(sf, 2.0 ** torch.ceil(torch.log2(want)))
    else:
        torch.testing.assert_close(sf, want)
    back = dequantize(q, sf, 1)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the slice amax (plus rounding of small values).
    assert float((back - x.float()).abs().max()) <= float(sf.max()) * 448 * 2**-4 + 1e-6
    assert calc_diff(back, x) < 1e-3


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (2, 130, 257)])
def test_per_block_cast(seed, shape):
    x = torch.randn(shape)
    q, sf = per_block_cast_to_fp8(x)
    n, k = shape[-2:]
    assert q.shape == x.shape and sf.shape == (*shape[:-2], -(-n // 128), -(-k // 128))
    xp = torch.nn.functional.pad(x, (0, sf.shape[-1] * 128 - k, 0, sf.shape[-2] * 128 - n))
    blocks = xp.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128))
    torch.testing.assert_close(sf, blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-4) / 448)
    assert calc_diff(dequantize(q, sf, 128), x) < 1e-3


def test_per_channel_cast_is_transposed_per_token(seed):
    x = torch.randn(300, 200)
    q, sf = per_channel_cast_to_fp8(x)
    qt, sft = per_token_cast_to_fp8(x.T.contiguous())
    assert sf.shape == (3, 200)
    torch.testing.assert_close(sf, sft.T)
    assert torch.equal(q.view(torch.uint8), qt.T.contiguous().view(torch.uint8))


def test_zero_blocks_get_the_clamped_scale():
    q, sf = per_token_cast_to_fp8(torch.zeros(2, 256))
    assert torch.equal(sf, torch.full((2, 2), 1e-4 / 448))
    assert not q.float().any()


def test_ceil_to_ue8m0_and_packing():
    x = torch.tensor([0.3, 1.0, 1.5, 5.0, 2.0**-20])
    assert torch.equal(ceil_to_ue8m0(x), torch.tensor([0.5, 1.0, 2.0, 8.0, 2.0**-20]))
    sf = ceil_to_ue8m0(torch.rand(3, 8) + 1e-3)
    packed = pack_ue8m0_to_int(sf)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2)
    assert torch.equal(unpack_ue8m0_from_int(packed), sf)


def test_fast_cpu_dequantisation_is_exact_for_every_byte():
    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = ~codes.float().isnan()
    x = codes[finite].reshape(2, 127)  # all 254 finite e4m3 values (sign, subnormals, 448)
    sf = torch.tensor([[0.5], [3.0]])
    got = dequantize_rows(x, sf)
    assert got.shape == (2, 128) and not got[:, 127:].any()
    assert torch.equal(got[:, :127], x.float() * sf)


def test_layout_helpers():
    assert get_m_alignment_for_contiguous_layout() == 128 == get_mk_alignment_for_contiguous_layout()
    assert get_tma_aligned_size(7, 4) == 8 and get_tma_aligned_size(8, 4) == 8 and get_tma_aligned_size(9, 2) == 16
    sf = torch.rand(3, 130, 5)
    t = get_col_major_tma_aligned_tensor(sf)
    assert t.shape == sf.shape and torch.equal(t, sf)
    assert t.stride() == (132 * 5, 1, 132)
    assert get_mn_major_tma_aligned_tensor(t) is t
    t2 = get_col_major_tma_aligned_tensor(sf[0])
    assert t2.stride() == (1, 132) and torch.equal(t2, sf[0])
    with pytest.raises(ValueError, match="x"):
        get_col_major_tma_aligned_tensor(torch.rand(4))


def test_calc_diff_definition(seed):
    x, y = torch.randn(50, 60), torch.randn(50, 60)
    xd, yd = x.double(), y.double()
    want = 1 - 2 * (xd * yd).sum() / (xd * xd + yd * yd).sum()
    assert calc_diff(x, y) == pytest.approx(float(want), rel=1e-12)
    assert calc_diff(x, x) == 0.0
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    assert calc_diff(x, -x) == pytest.approx(2.0)


@pytest.mark.parametrize("fn", [per_token_cast_to_fp8, per_block_cast_to_fp8, per_channel_cast_to_fp8])
def test_cast_rejects_bad_input(fn):
    with pytest.raises(ValueError, match="x"):
        fn(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="x"):
        fn(torch.zeros(4, 4).to(FP8))
