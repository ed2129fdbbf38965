"""The C decode of the CPU GEMM (`seekstack.gemm.native_decode`): bit for bit equal to torch's own `x.float() * s`
and `.to(torch.bfloat16)`, in both builds (AVX-512 and portable), on every e4m3 byte, odd shapes, strided rows,
NaN-poisoned memory, several threads and flush-to-zero; the GEMM gives the same bits with it as without it; and the
one-call weight-left GEMM (decode, MKL sgemm and transpose per thread) matches the reference over odd shapes, chunk
sizes and thread counts without writing outside `d`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from seekstack import cpu_native
from seekstack.gemm import calc_diff, cpu, native_decode, reference
from seekstack.gemm.layout import ceil_div

FP8 = torch.float8_e4m3fn
PORTABLE = cpu_native.NativeLibrary(
    "gemm_decode_portable",
    native_decode.LIBRARY.source,
    extra_flags=("-DSEEKSTACK_PORTABLE",),
    openmp=True,
    headers=native_decode.HEADERS,
)
needs_compiler = pytest.mark.skipif(cpu_native.compiler() is None, reason="needs a C compiler")
pytestmark = needs_compiler


@pytest.fixture(params=["native", "portable"])
def library(request, monkeypatch):
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "auto")
    lib = native_decode.LIBRARY if request.param == "native" else PORTABLE
    assert native_decode.available(lib), lib.failed
    return lib


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bitwise equality, NaN positions included (NaN payloads may differ)."""
    nan = want.isnan()
    return (
        torch.equal(got.isnan(), nan)
        and torch.equal(got[~nan], want[~nan])
        and torch.equal(got[~nan].signbit(), want[~nan].signbit())
    )


def _all_bytes(rows: int, cols: int) -> torch.Tensor:
    """Random e4m3 bytes, NaN included, with every byte value present when there is room."""
    x = torch.randint(0, 256, (rows, cols), dtype=torch.int16).to(torch.uint8)
    x.view(-1)[: min(256, x.numel())] = torch.arange(256, dtype=torch.int16).to(torch.uint8)[: x.numel()]
    return x.view(FP8)


def _strided(x: torch.Tensor, extra: int) -> torch.Tensor:
    """`x` as the left columns of a wider buffer (rows strided), the rest NaN bytes."""
    buf = torch.full((x.shape[0], x.shape[1] + extra), 0x7F, dtype=torch.uint8).view(FP8)
    buf[:, : x.shape[1]] = x
    return buf[:, : x.shape[1]]


# Scales in the table form's exact range, and outside it (the portable loop then runs): 0, tiny, huge, inf.
SPECIAL_SCALES = [0.0, -0.0, 2.0**-120, 2.0**-117, 3.0 * 2.0**121, 2.0**122, 2.0**126, float("inf"), -1.5]


@pytest.mark.parametrize("rows,k,gran,row0", [(1, 1, 1, 0), (3, 17, 1, 0), (5, 129, 1, 0), (40, 300, 128, 0),
                                              (37, 256, 128, 100), (130, 128, 128, 0)])  # fmt: skip
def test_decode_rows_equals_torch(seed, library, rows, k, gran, row0):
    x = _strided(_all_bytes(rows, k), 7)
    kb, kp = ceil_div(k, 128), ceil_div(k, 128) * 128
    srows = ceil_div(row0 + rows, gran)
    sf = 2.0 ** (torch.rand(srows, kb) * 40 - 20) * torch.randn(srows, kb).sign()
    sf.view(-1)[: len(SPECIAL_SCALES)] = torch.tensor(SPECIAL_SCALES)[: sf.numel()]
    out = torch.full((rows, kp + 3), float("nan"))[:, :kp]  # strided and poisoned
    assert native_decode.decode_rows(x, sf, out, row0=row0, gran=gran, library=library)
    scale = sf[(torch.arange(rows) + row0) // gran].repeat_interleave(128, dim=1)[:, :k]
    assert _same(out[:, :k], x.float() * scale)
    assert not out[:, k:].any() and not out[:, k:].isnan().any()


@pytest.mark.parametrize("rows,k", [(1, 1), (7, 129), (16, 128), (33, 300), (64, 1000)])
def test_decode_rows_transposed_equals_torch(seed, library, rows, k):
    x = _strided(_all_bytes(rows, k), 3)
    kp = ceil_div(k, 128) * 128
    sf = 2.0 ** (torch.rand(rows, ceil_div(k, 128)) * 20 - 10)
    buf = torch.full((kp, rows + 5), float("nan"))
    out = buf[:, :rows]
    assert native_decode.decode_rows_t(x, sf, out, library=library)
    want = x.float() * sf.repeat_interleave(128, dim=1)[:, :k]
    assert _same(out[:k], want.T)
    assert not out[k:].any() and not out[k:].isnan().any()
    assert buf[:, rows:].isnan().all()  # nothing written beyond the rows


@pytest.mark.parametrize("rows,cols", [(1, 1), (15, 3), (16, 16), (37, 64), (1024, 7)])
def test_bf16_transposed_equals_torch(seed, library, rows, cols):
    src = torch.randn(rows, cols) * 2.0 ** torch.randint(-130, 130, (rows, cols))  # subnormals to inf
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("nan"), -float("nan"), float("inf"), -0.0])
    src.view(-1)[: ties.numel()] = ties[: src.numel()]
    src = torch.cat([src, torch.full((rows, 2), float("nan"))], dim=1)[:, :cols]  # strided rows
    dst_buf = torch.full((cols, rows + 6), 3.0, dtype=torch.bfloat16)
    dst = dst_buf[:, 2 : 2 + rows]
    assert native_decode.bf16_transposed(src, dst, library=library)
    assert _same(dst.float(), src.T.to(torch.bfloat16).float())
    assert (dst_buf[:, :2] == 3).all() and (dst_buf[:, 2 + rows :] == 3).all()


def test_several_threads_split_the_rows(library, monkeypatch):
    version = subprocess.run([cpu_native.compiler(), "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" in version:  # gcc has OpenMP: the split below is real
        assert library.load().seekstack_openmp() == 1
        # ... and runs on torch's own libgomp, not a second OpenMP runtime
        maps = Path("/proc/self/maps").read_text().splitlines()
        assert len({line.split()[-1] for line in maps if "libgomp" in line}) == 1
    monkeypatch.setattr(native_decode, "_MIN_PART_ELEMENTS", 256)
    x = _all_bytes(301, 200)
    sf = torch.rand(301, 2) + 0.5
    want = x.float() * sf.repeat_interleave(128, dim=1)[:, :200]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert native_decode._parts(301, 256) == 3
        out, out_t = torch.empty(301, 256), torch.empty(256, 301)
        assert native_decode.decode_rows(x, sf, out, library=library)
        assert native_decode.decode_rows_t(x, sf, out_t, library=library)
        # 301 x 7 splits into 3 parts of at least 256 elements (the split then runs on the bf16 transpose too)
        src, dst = torch.randn(301, 7), torch.empty(7, 301, dtype=torch.bfloat16)
        assert native_decode._parts(301, 7) == 3 and native_decode.bf16_transposed(src, dst, library=library)
    finally:
        torch.set_num_threads(threads)
    assert _same(out[:, :200], want) and _same(out_t[:200], want.T)
    assert torch.equal(dst, src.T.to(torch.bfloat16))


def test_exact_under_flush_to_zero(library):
    # No step makes an fp32 subnormal, so e4m3 subnormals (2**-9 .. 7 * 2**-9) survive FTZ/DAZ.
    x = _all_bytes(2, 256)
    sf = torch.tensor([[1.0, 0.75], [3.0, 2.0**-100]])
    out = torch.empty(2, 256)
    torch.set_flush_denormal(True)
    try:
        assert native_decode.decode_rows(x, sf, out, library=library)
    finally:
        torch.set_flush_denormal(False)
    assert _same(out, x.float() * sf.repeat_interleave(128, dim=1))


def test_gemm_gives_the_same_bits_with_and_without_it(seed, monkeypatch):
    # Weight-left with a bf16 d (C transpose), activation-left, 1x128 and 128x128 weight scales, C added.
    for m, n, k, gran, c in [(7, 300, 129, 128, False), (64, 200, 100, 1, False), (200, 130, 300, 128, True)]:
        a, b = torch.randn(m, k).to(FP8), torch.randn(n, k).to(FP8)
        sfa, sfb = torch.rand(m, ceil_div(k, 128)) + 0.1, torch.rand(ceil_div(n, gran), ceil_div(k, 128)) + 0.1
        cin = torch.randn(m, n) if c else None
        outs = []
        for mode in ["auto", "off"]:
            monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", mode)
            assert native_decode.available() == (mode == "auto")
            d = torch.full((m, n), float("nan"), dtype=torch.float32 if c else torch.bfloat16)
            cpu.gemm(a, sfa, b, sfb, gran, d, cin)
            outs.append(d)
        assert torch.equal(outs[0], outs[1])
        want = torch.empty(m, n)
        reference.gemm(a, sfa, b, sfb, gran, want, cin)
        assert (outs[0].float() - want).abs().max() <= 1e-2 * want.abs().max()


needs_mkl = pytest.mark.skipif(native_decode.mkl_sgemm() is None, reason="torch built without MKL")


@needs_mkl
@pytest.mark.parametrize(
    "m,n,k,gran,chunk,threads",
    [
        (7, 300, 129, 128, 64, 1),  # 5 chunks, the last one short; K padded to 256
        (7, 300, 129, 128, 64, 3),  # the same over 3 threads
        (64, 200, 100, 1, 37, 2),  # 1x128 weight scales, chunks not a multiple of anything
        (33, 1000, 640, 128, 1000, 2),  # one chunk: one thread idle
        (1, 17, 128, 128, 5, 2),
    ],
)
def test_one_call_weight_left_gemm_matches_the_reference(seed, m, n, k, gran, chunk, threads):
    a, b = torch.randn(m, k).to(FP8), _strided(torch.randn(n, k).to(FP8), 5)
    sfa = torch.rand(m, ceil_div(k, 128)) + 0.1
    sfb = torch.rand(ceil_div(n, gran), ceil_div(k, 128)) * 4 + 0.1
    d_buf = torch.full((m, n + 6), float("nan"), dtype=torch.bfloat16)
    d = d_buf[:, 3 : 3 + n]  # rows strided, NaN on both sides
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert native_decode.gemm_weight_left(_strided(a, 3), sfa, b, sfb, gran, d, chunk)
    finally:
        torch.set_num_threads(before)
    want = torch.empty(m, n)
    reference.gemm(a, sfa, b, sfb, gran, want, None)
    assert d.isfinite().all() and d_buf[:, :3].isnan().all() and d_buf[:, 3 + n :].isnan().all()
    # fp32 sums in another order, then one bf16 rounding (2**-9 relative, a tie may go either way)
    assert ((d.float() - want).abs() <= 2.0**-8 * want.abs() + 1e-6 * want.abs().max()).all()


@needs_mkl
def test_cpu_gemm_takes_the_one_call_path_where_it_applies(seed, monkeypatch):
    calls = []
    real = native_decode.gemm_weight_left
    monkeypatch.setattr(native_decode, "gemm_weight_left", lambda *args: calls.append(args[-1]) or real(*args))
    a, b = torch.randn(64, 1792).to(FP8), torch.randn(300, 1792).to(FP8)
    sfa, sfb = torch.rand(64, 14) + 0.1, torch.rand(3, 14) + 0.1
    want = torch.empty(64, 300)
    reference.gemm(a, sfa, b, sfb, 128, want, None)
    d = torch.empty(64, 300, dtype=torch.bfloat16)
    cpu.gemm(a, sfa, b, sfb, 128, d, None)
    assert len(calls) == 1 and calls[0] == cpu._fused_chunk_rows(300, 1792)
    assert calc_diff(d, want) < 1e-5
    # with C to add, an fp32 d, or no MKL the chunked torch path runs
    cpu.gemm(a, sfa, b, sfb, 128, torch.empty(64, 300), torch.zeros(64, 300))
    cpu.gemm(a, sfa, b, sfb, 128, torch.empty(64, 300), None)
    monkeypatch.setattr(native_decode, "mkl_sgemm", lambda: None)
    d2 = torch.empty(64, 300, dtype=torch.bfloat16)
    cpu.gemm(a, sfa, b, sfb, 128, d2, None)
    assert len(calls) == 1 and calc_diff(d2, want) < 1e-5


def test_fused_chunks_are_even_over_the_threads(monkeypatch):
    monkeypatch.setattr(cpu, "_FUSED_CHUNK_BYTES", 1 << 20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu._fused_chunk_rows(528, 1792) == 132  # 3.8 MB: 4 chunks, 2 per thread
        assert cpu._fused_chunk_rows(100, 128) == 50  # small: one chunk per thread
        torch.set_num_threads(1)
        assert cpu._fused_chunk_rows(528, 1792) == 132
    finally:
        torch.set_num_threads(before)


@needs_mkl
def test_one_call_gemm_rejects_bad_operands():
    a, b, sfa, sfb = torch.randn(4, 128).to(FP8), torch.randn(10, 128).to(FP8), torch.ones(4, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="d: bf16"):
        native_decode.gemm_weight_left(a, sfa, b, sfb, 128, torch.empty(10, 4, dtype=torch.bfloat16), 4)
    with pytest.raises(ValueError, match="d: bf16"):
        native_decode.gemm_weight_left(a, sfa, b, sfb, 128, torch.empty(4, 10), 4)
    with pytest.raises(ValueError, match="b: K = 128"):
        native_decode.gemm_weight_left(a, sfa, b[:, :100], sfb, 128, torch.empty(4, 10, dtype=torch.bfloat16), 4)
    with pytest.raises(ValueError, match="sf: contiguous fp32"):
        native_decode.gemm_weight_left(a, sfa.double(), b, sfb, 128, torch.empty(4, 10, dtype=torch.bfloat16), 4)


def test_a_failed_build_warns_once_and_the_eager_path_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKSTACK_CACHE_DIR", str(tmp_path))
    broken_source = tmp_path / "broken.c"
    broken_source.write_text("this is not C\n")
    broken = cpu_native.NativeLibrary("broken", broken_source)
    with pytest.warns(UserWarning, match="native CPU kernels broken are off"):
        assert broken.load() is None
    assert "failed" in broken.failed
    assert broken.load() is None  # no second attempt, no second warning
    x = torch.randn(3, 200).to(FP8)
    assert not native_decode.decode_rows(x, torch.ones(3, 2), torch.empty(3, 256), library=broken)


def test_the_build_is_cached_by_source_flags_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKSTACK_CACHE_DIR", str(tmp_path))
    first = cpu_native.NativeLibrary("decode_a", native_decode.LIBRARY.source)
    assert first.load() is not None
    built = list((tmp_path / "native").glob("decode_a-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    again = cpu_native.NativeLibrary("decode_a", native_decode.LIBRARY.source)
    assert again.load() is not None and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    other = cpu_native.NativeLibrary("decode_a", native_decode.LIBRARY.source, extra_flags=("-DSEEKSTACK_PORTABLE",))
    assert other.load() is not None
    assert len(list((tmp_path / "native").glob("decode_a-*.so"))) == 2
    assert not list((tmp_path / "native").glob(".*"))  # no temporary files left


def test_an_included_header_is_part_of_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SEEKSTACK_CACHE_DIR", str(tmp_path / "cache"))
    header, source = tmp_path / "value.h", tmp_path / "lib.c"
    source.write_text('#include "value.h"\nint seekstack_value(void) { return VALUE; }\n')
    values = []
    for value in (1, 2):
        header.write_text(f"#define VALUE {value}\n")
        values.append(cpu_native.NativeLibrary("value", source, headers=(header,)).load().seekstack_value())
    assert values == [1, 2]


def test_switched_off(monkeypatch):
    monkeypatch.setenv("SEEKSTACK_CPU_COMPILE", "off")
    assert not native_decode.available()
    x = torch.randn(2, 10).to(FP8)
    assert torch.equal(cpu.dequantize_rows(x, torch.ones(2, 1))[:, :10], x.float())
