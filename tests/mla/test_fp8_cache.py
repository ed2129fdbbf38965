"""The V3.2 FP8 cache layout: 656 bytes per token (512 e4m3, 4 fp32 power-of-two scales, 64 bf16 RoPE values)."""

from __future__ import annotations

import math

import pytest
import torch

from seekstack.mla import flash_mla_with_kvcache, fp8_bytes_per_token, pack_fp8_kvcache, unpack_fp8_kvcache
from seekstack.mla.testing import check_decode, make_case


def test_bytes_per_token():
    assert fp8_bytes_per_token() == 656
    assert fp8_bytes_per_token(576, 512) == 512 + 4 * 4 + 2 * 64
    assert fp8_bytes_per_token(320, 256) == 256 + 2 * 4 + 2 * 64
    with pytest.raises(ValueError, match="head_dim_v"):
        fp8_bytes_per_token(576, 500)


def test_layout_byte_by_byte(gen):
    kv = torch.randn(3, 5, 1, 576, generator=gen) * torch.logspace(-3, 2, 576)[torch.randperm(576, generator=gen)]
    kv = kv.to(torch.bfloat16)
    packed = pack_fp8_kvcache(kv)
    assert packed.shape == (3, 5, 1, 656) and packed.dtype == torch.float8_e4m3fn
    raw = packed.view(torch.uint8)
    scales = raw[..., 512:528].contiguous().view(torch.float32)  # [3, 5, 1, 4]
    tiles = kv[..., :512].float().unflatten(-1, (4, 128))
    expected_scales = 2.0 ** torch.ceil(torch.log2(torch.clamp_min(tiles.abs().amax(-1) / 448, 1e-4)))
    assert torch.equal(scales, expected_scales)
    assert torch.equal(torch.log2(scales), torch.log2(scales).round()), "scales must be powers of two"
    nope = raw[..., :512].contiguous().view(torch.float8_e4m3fn)
    assert torch.equal(nope.float(), (tiles / expected_scales[..., None]).flatten(-2).to(torch.float8_e4m3fn).float())
    assert torch.equal(raw[..., 528:].contiguous().view(torch.bfloat16), kv[..., 512:])


def test_round_trip_error_is_within_half_an_fp8_step(gen):
    kv = (torch.randn(4, 64, 2, 576, generator=gen) / 10).to(torch.bfloat16)
    packed = pack_fp8_kvcache(kv)
    back = unpack_fp8_kvcache(packed)
    assert back.dtype == torch.bfloat16 and back.shape == kv.shape
    assert torch.equal(back[..., 512:], kv[..., 512:]), "RoPE values are stored unquantized"
    scale = packed.view(torch.uint8)[..., 512:528].contiguous().view(torch.float32).repeat_interleave(128, -1)
    err = (back[..., :512].float() - kv[..., :512].float()).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative; subnormals (below 2^-6 * scale) step 2^-9 * scale
    assert torch.all(err <= kv[..., :512].float().abs() * 2**-4 + scale * 2**-10)


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.uint8, torch.int8])
def test_storage_dtypes_decode_alike(gen, storage):
    case = make_case(3, 2, 16, 1, 150, block_size=16, fp8=True, varlen=True, causal=True, generator=gen)
    want = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    case.k_cache = case.k_cache.view(storage)
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("block_size", [1, 16, 64])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (4, True)])
def test_fp8_decode_matches_reference(gen, block_size, s_q, causal):
    case = make_case(4, s_q, 16, 1, 200, block_size=block_size, fp8=True, varlen=True, zero_lengths=1,
                     causal=causal, generator=gen)  # fmt: skip
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="cpu")
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


def test_flashmla_padded_block_stride(gen):
    """FlashMLA's quantize_k_cache returns [nb, bs + 1, 656][:, :bs]: a strided cache must decode the same."""
    case = make_case(3, 2, 16, 1, 150, block_size=16, fp8=True, varlen=True, causal=True, generator=gen)
    padded = torch.zeros(case.k_cache.shape[0], 17, 1, 656, dtype=case.k_cache.dtype)
    padded[:, :16] = case.k_cache
    want = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    case.k_cache = padded[:, :16]
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fp8_close_to_bf16(gen):
    """Quantization changes the output by about the fp8 step of V, not more."""
    case = make_case(2, 1, 16, 1, 300, poison=False, generator=gen)
    out_bf16, lse_bf16 = flash_mla_with_kvcache(*case.args())
    case.k_cache, case.is_fp8_kvcache = pack_fp8_kvcache(case.k_cache), True
    out_fp8, lse_fp8 = flash_mla_with_kvcache(*case.args(), **case.kwargs())
    cos = torch.nn.functional.cosine_similarity(out_fp8.float().flatten(), out_bf16.float().flatten(), dim=0)
    assert cos > 0.99 and (lse_fp8 - lse_bf16).abs().max() < 1e-2
    assert not math.isnan(float(cos))
