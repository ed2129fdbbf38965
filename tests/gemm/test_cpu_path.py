"""The CPU path's plans against the reference: weight-left (`w @ a.T`) and activation-left matmuls, chunked or whole
weights, 1x128 and 128x128 weight scales, on fp8 operands drawn from every finite e4m3 code (subnormals, zeros, ±448)
and held in NaN-poisoned memory."""

from __future__ import annotations

import pytest
import torch

from seekstack.gemm import calc_diff, cpu, reference
from seekstack.gemm.layout import ceil_div

FP8 = torch.float8_e4m3fn
_CODES = torch.arange(256, dtype=torch.uint8).view(FP8)
_FINITE = _CODES[~_CODES.float().isnan()]  # the 254 finite e4m3 values
_EDGES = torch.tensor([448.0, -448.0, 2.0**-9, -(2.0**-9), 7 * 2.0**-9, -(7 * 2.0**-9), 0.0]).to(FP8)


def _codes(rows: int, cols: int) -> torch.Tensor:
    """Random finite e4m3 values with the extremes (±448, smallest and largest subnormals) always present."""
    x = _FINITE[torch.randint(0, _FINITE.numel(), (rows, cols))]
    x.view(-1)[: _EDGES.numel()] = _EDGES[: x.numel()]
    return x


def _poisoned(t: torch.Tensor, extra_cols: int) -> torch.Tensor:
    """`t` as a column slice of a wider buffer whose other columns are NaN (0x7F bytes for fp8)."""
    buf = torch.full((t.shape[0], t.shape[1] + extra_cols), float("nan"))
    buf = buf.to(t.dtype)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def _scales(rows: int, cols: int) -> torch.Tensor:
    return 2.0 ** (torch.rand(rows, cols) * 12 - 6)


def _operands(m: int, n: int, k: int, b_gran: int):
    kb = ceil_div(k, 128)
    a, b = _poisoned(_codes(m, k), 5), _poisoned(_codes(n, k), 3)
    sfa, sfb = _poisoned(_scales(m, kb), 1), _poisoned(_scales(ceil_div(n, b_gran), kb), 2)
    return a, sfa, b, sfb


# (m, n, k, b_gran, chunk bytes, expected plan as (rows per chunk, weight-left))
CASES = [
    (7, 300, 129, 128, 64 << 10, (64, True)),  # 5 chunks, the last one short
    (64, 200, 128, 128, 16 << 10, (32, False)),  # k < 4m: activation-left
    (130, 96, 300, 1, 32 << 10, (32, False)),  # 1x128 weight scales
    (40, 257, 1000, 1, 512 << 10, (96, True)),  # 1x128 weight scales, unaligned K
    (300, 130, 200, 128, 512 << 10, (130, False)),  # large M: the whole weight at once
]


@pytest.mark.parametrize("m,n,k,b_gran,chunk,plan", CASES)
@pytest.mark.parametrize("out_dtype,with_c", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("decode", ["native", "eager"])  # the C decode (when it builds here) and the torch passes
def test_plans_match_the_dequantised_reference(
    seed, monkeypatch, m, n, k, b_gran, chunk, plan, out_dtype, with_c, decode
):
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", chunk)
    monkeypatch.setattr(cpu, "_THREADED_CHUNK_BYTES", chunk)  # several chunks whatever the thread count
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "auto" if decode == "native" else "off")
    assert cpu._plan(m, n, ceil_div(k, 128) * 128) == plan  # the eager plans; native ones: test_native_plans
    a, sfa, b, sfb = _operands(m, n, k, b_gran)
    c = torch.randn(m, n) * 1e3 if with_c else None
    want = torch.empty(m, n)
    reference.gemm(a, sfa, b, sfb, b_gran, want, c)
    d = torch.full((m, n), float("nan"), dtype=out_dtype)
    cpu.gemm(a, sfa, b, sfb, b_gran, d, c)
    assert d.isfinite().all()
    # fp32: only the summation order differs; bf16: plus the output rounding (2**-9 relative).
    assert calc_diff(d, want) < (1e-10 if out_dtype == torch.float32 else 1e-5)


def test_native_plans(monkeypatch):
    # With the C decode the weight goes left from K >= M on one thread (its transposes are cheap), from K >= 4 M on
    # several unless the one-call C path runs, and a chunk grows with the threads that decode it.
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(cpu, "_THREADED_CHUNK_BYTES", 64 << 10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu._plan(64, 1000, 128, native=True) == (32, True)
        assert cpu._plan(64, 1000, 128, native=False) == (32, False)
        assert cpu._plan(130, 1000, 128, native=True) == (32, False)
        torch.set_num_threads(2)
        assert cpu._plan(64, 1000, 128, native=True) == (256, False)
        assert cpu._plan(32, 1000, 128, native=True) == (256, True)
        assert cpu._plan(64, 1000, 128, native=False) == (32, False)
        # the one-call C path transposes per thread in cache: weight-left from K >= M again
        assert cpu._plan(64, 1000, 128, native=True, fused=True) == (256, True)
        assert cpu._plan(130, 1000, 128, native=True, fused=True) == (256, False)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("m,k", [(7, 129), (64, 128)])
def test_accumulating_in_place(seed, m, k):
    # wgrad's form: c is d itself.
    a, sfa, b, sfb = _operands(m, 150, k, 1)
    d = torch.randn(m, 150)
    want = torch.empty(m, 150)
    reference.gemm(a, sfa, b, sfb, 1, want, d.clone())
    cpu.gemm(a, sfa, b, sfb, 1, d, d)
    assert calc_diff(d, want) < 1e-10


def test_large_m_in_chunks(seed, monkeypatch):
    # As if the fp32 weight were too large to materialise, and 1024-row pieces (the minimum) the right size.
    monkeypatch.setattr(cpu, "_WHOLE_BYTES", 0)
    monkeypatch.setattr(cpu, "_LARGE_CHUNK_BYTES", 0)
    a, sfa, b, sfb = _operands(256, 1100, 100, 128)
    assert cpu._plan(256, 1100, 128) == (1024, False)
    want, d = torch.empty(256, 1100), torch.full((256, 1100), float("nan"), dtype=torch.bfloat16)
    reference.gemm(a, sfa, b, sfb, 128, want, None)
    cpu.gemm(a, sfa, b, sfb, 128, d, None)
    assert calc_diff(d, want) < 1e-5


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_decodes_are_exact_for_every_byte(flush_denormal):
    # The fp16 route keeps e4m3 subnormals exact even with FTZ/DAZ set: fp16 subnormals widen to normal fp32.
    # (An fp32 bit-pattern route would make them fp32 denormals, flushed to zero under DAZ.)
    x = _FINITE.reshape(2, 127)
    sf = torch.tensor([[0.5], [3.0]])
    col_major = torch.empty(1, 2).T.copy_(sf)  # DeepGEMM's TMA-aligned scale layout
    torch.set_flush_denormal(flush_denormal)
    try:
        flushing = (torch.tensor([1e-40]) * 1.0).item() == 0.0
        rows = cpu.dequantize_rows(x, sf)
        cols = cpu.dequantize_rows_transposed(x, col_major)
    finally:
        torch.set_flush_denormal(False)
    assert flushing == flush_denormal
    want = x.float() * sf
    assert torch.equal(rows[:, :127], want) and not rows[:, 127:].any()
    assert cols.shape == (128, 2) and torch.equal(cols[:127], want.T) and not cols[127:].any()
