"""The Triton split-KV + combine kernels, run by Triton's interpreter on small shapes (conftest sets
TRITON_INTERPRET=1 without a GPU), against the reference with FlashMLA's tolerances. Plans use more workers than
the CPU has threads so that requests are split and the combine kernel runs."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from seekstack.mla import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from seekstack.mla.testing import check_decode, make_case  # noqa: E402
from seekstack.mla.triton_decode import _e4m3_to_f32, _round_to_bf16  # noqa: E402

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU runs are in test_gpu.py")
pytestmark = needs_interpreter


def run_triton(case, num_sms=8, **kwargs):
    q, k_cache = case.q, case.k_cache
    h_kv = k_cache.shape[2]
    s_q, h_q = q.shape[1], q.shape[2]
    if case.indices is None:
        meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_sms=num_sms * h_kv)
    else:
        meta, splits = get_mla_metadata(case.cache_seqlens, s_q * h_q // h_kv, h_kv, num_heads_q=h_q,
                                        topk=case.indices.shape[-1], num_sms=num_sms * h_kv)  # fmt: skip
    kwargs = {**case.kwargs(), **kwargs}
    got = flash_mla_with_kvcache(*case.args(), meta, splits, **kwargs, backend="triton")
    ref = flash_mla_with_kvcache(*case.args(), **kwargs, backend="reference")
    check_decode(*got, *ref)
    return got, splits


@pytest.mark.parametrize(
    "s_q,causal,h_q,h_kv,block_size,dtype",
    [
        (1, False, 16, 1, 64, torch.bfloat16),
        (2, True, 16, 1, 64, torch.bfloat16),
        (4, True, 16, 2, 16, torch.bfloat16),
        (1, False, 1, 1, 1, torch.bfloat16),
        (2, True, 1, 1, 16, torch.float16),
        (2, False, 128, 1, 64, torch.bfloat16),
        (1, True, 128, 2, 16, torch.bfloat16),
        (4, True, 16, 1, 1, torch.float32),
        (2, True, 16, 2, 64, torch.float16),
    ],
)
def test_recipe(gen, s_q, causal, h_q, h_kv, block_size, dtype):
    case = make_case(3, s_q, h_q, h_kv, 200, block_size=block_size, dtype=dtype, varlen=True, zero_lengths=1,
                     causal=causal, generator=gen)  # fmt: skip
    (out, lse), splits = run_triton(case)
    assert out.dtype == dtype and lse.dtype == torch.float32


def test_split_requests_are_combined(gen):
    case = make_case(2, 2, 16, 1, 700, block_size=16, causal=True, generator=gen)
    _, splits = run_triton(case, num_sms=12)
    assert int(splits[-1]) > 2, "the plan should cut the requests into several pieces"


def test_default_plan(gen):
    case = make_case(3, 1, 16, 1, 100, varlen=True, generator=gen)
    got = flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="triton")
    check_decode(*got, *flash_mla_with_kvcache(*case.args(), **case.kwargs(), backend="reference"))


@pytest.mark.parametrize("d,dv", [(320, 256), (192, 128), (128, 128), (96, 40)])
def test_head_dims(gen, d, dv):
    case = make_case(2, 2, 16, 1, 150, d=d, dv=dv, block_size=16, varlen=True, causal=True, generator=gen)
    run_triton(case)


@pytest.mark.parametrize("h_kv", [1, 2])
def test_fp8_cache(gen, h_kv):
    case = make_case(3, 2, 16, h_kv, 200, block_size=16, fp8=True, varlen=True, zero_lengths=1, causal=True,
                     generator=gen)  # fmt: skip
    run_triton(case)


def test_fp8_decoded_from_bits(gen, monkeypatch):
    """The integer e4m3 decoding used on GPUs without native fp8 (Ampere)."""
    from seekstack.mla import triton_decode

    monkeypatch.setattr(triton_decode, "FORCE_FP8_FROM_BITS", True)
    case = make_case(3, 2, 16, 1, 200, block_size=16, fp8=True, varlen=True, zero_lengths=1, causal=True,
                     generator=gen)  # fmt: skip
    run_triton(case)


@triton.jit
def _e4m3_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _e4m3_to_f32(tl.load(X + offs)))


def test_e4m3_bits_decode_every_value():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256)
    _e4m3_kernel[(1,)](bits, out, N=256)
    want = bits.view(torch.float8_e4m3fn).float()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out[~want.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("s_q,h_kv", [(1, 1), (2, 1), (3, 2)])
def test_sparse(gen, fp8, s_q, h_kv):
    case = make_case(3, s_q, 16, h_kv, 300, block_size=16, fp8=fp8, topk=96, varlen=True, zero_lengths=1,
                     generator=gen)  # fmt: skip
    run_triton(case, num_sms=16)


@triton.jit
def _bf16_store_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _round_to_bf16(tl.load(X + offs)).to(tl.bfloat16))


def test_bf16_store_rounds_to_nearest_even():
    """The interpreter truncates fp32 -> bf16; the kernels round by hand first, matching torch bit for bit."""
    x = torch.randn(4096) * 3
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38])  # ties (even down, up), overflow
    y = torch.empty(4096, dtype=torch.bfloat16)
    _bf16_store_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16))


def test_falls_back_to_smaller_tiles_when_shared_memory_runs_out(gen, monkeypatch):
    """A GPU with less shared memory than the first tile needs (consumer Ampere/Ada) gets the next candidate."""
    from triton.runtime.errors import OutOfResources

    from seekstack.mla import triton_decode

    kernel, tried = triton_decode._splitkv_kernel, []

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, **kwargs):
                tried.append(BLOCK_M)
                if BLOCK_M == 128:
                    raise OutOfResources(232448, 101376, "shared memory")
                return kernel[grid](*args, BLOCK_M=BLOCK_M, **kwargs)

            return launch

    monkeypatch.setattr(triton_decode, "_splitkv_kernel", Launcher())
    monkeypatch.setattr(triton_decode, "_configs", lambda rows, upcast: [(128, 64, 4, 1), (16, 64, 4, 1)])
    monkeypatch.setattr(triton_decode, "_WORKING_CONFIG", {})
    case = make_case(2, 2, 16, 1, 150, varlen=True, causal=True, generator=gen)
    run_triton(case)
    run_triton(case)
    assert tried == [128, 16, 16], "the working candidate is remembered"
