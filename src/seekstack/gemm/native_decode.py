"""FP8 decode of the CPU GEMM in one C pass (`cpu_decode.c` through `seekstack.cpu_native`), eager when unavailable.

`decode_rows` and `decode_rows_t` return False when the C library cannot be used (no compiler, compiling switched
off), and the caller runs its eager passes. Results equal `x.float() * scale` bit for bit, like the eager path.
With several torch threads the rows are split over torch's own OpenMP threads (see `cpu_decode.c`).

>>> x = torch.randn(3, 200).to(torch.float8_e4m3fn)
>>> sf = torch.ones(3, 2)
>>> out = torch.empty(3, 256)
>>> # decode_rows(x, sf, out) -> True and out[:, :200] == x.float(), out[:, 200:] == 0
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from seekstack.cpu_native import NativeLibrary

HEADERS = (Path(__file__).with_name("e4m3.h"),)
LIBRARY = NativeLibrary("gemm_decode", Path(__file__).with_name("cpu_decode.c"), openmp=True, headers=HEADERS)
# Below this many elements per thread a split costs more than it saves (waking an OpenMP thread: a few us).
_MIN_PART_ELEMENTS = 1 << 15

_I, _P = ctypes.c_int64, ctypes.c_void_p
_fns: dict[str, tuple] = {}


def available(library: NativeLibrary = LIBRARY) -> bool:
    """Whether the C decode runs in this process (it builds the library on the first call)."""
    return _functions(library) is not None


def _functions(library: NativeLibrary):
    lib = library.load()
    if lib is None:
        return None
    fns = _fns.get(library.name)
    if fns is None:
        rows, rows_t = lib.seekstack_decode_e4m3_rows, lib.seekstack_decode_e4m3_rows_t
        to_bf16_t = lib.seekstack_f32_to_bf16_t
        rows.restype = rows_t.restype = to_bf16_t.restype = None
        rows.argtypes = [_P, _I, _I, _I, _I, _P, _I, _I, _P, _I, _I, _I]
        rows_t.argtypes = [_P, _I, _I, _I, _P, _I, _P, _I, _I, _I]
        to_bf16_t.argtypes = [_P, _I, _I, _I, _P, _I, _I]
        fused = lib.seekstack_fp8_gemm_weight_left
        fused.restype = ctypes.c_int
        fused.argtypes = [_P, _I, _I, _P, _I, _P, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _I, _I, _P]
        fns = _fns[library.name] = rows, rows_t, to_bf16_t, fused
    return fns


_mkl: int | None | bool = False  # not looked up yet


def mkl_sgemm() -> int | None:
    """The address of MKL's Fortran `sgemm_` in torch's own libtorch_cpu, or None when torch was built without MKL
    (then `gemm_weight_left` is not used)."""
    global _mkl
    if _mkl is False:
        _mkl = None
        if torch.backends.mkl.is_available():
            try:
                lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
                _mkl = ctypes.cast(lib.sgemm_, ctypes.c_void_p).value or None
            except (OSError, AttributeError):
                _mkl = None
    return _mkl


def _parts(rows: int, elements_per_row: int) -> int:
    return max(1, min(torch.get_num_threads(), rows * elements_per_row // _MIN_PART_ELEMENTS, rows))


def _operands(x: torch.Tensor, sf: torch.Tensor, out: torch.Tensor) -> tuple[int, ...]:
    """(x pointer, x row stride, sf pointer, sf row stride, out pointer, out row stride), checked."""
    # Internal callers pass these (and check `x.stride(1) == 1`); a mismatch would be a bug in seekstack.gemm.
    if x.dtype != torch.float8_e4m3fn or x.stride(1) != 1 or sf.dtype != torch.float32 or not sf.is_contiguous():
        raise ValueError(f"x: fp8 rows with unit column stride and sf: contiguous fp32 expected, got {x.dtype}")
    if out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out: fp32 with unit column stride expected, got {out.dtype} {out.stride()}")
    return x.data_ptr(), x.stride(0), sf.data_ptr(), sf.stride(0), out.data_ptr(), out.stride(0)


def decode_rows(
    x: torch.Tensor, sf: torch.Tensor, out: torch.Tensor, row0: int = 0, gran: int = 1, library=LIBRARY
) -> bool:
    """`out[r, :k] = x[r].float() * sf[(row0 + r) // gran]` per 128 columns, `out[r, k:] = 0`; False if unavailable.

    `x [rows, k]` fp8 e4m3 (rows may be strided), `sf` fp32 contiguous with `ceil(k / 128)` columns, `out [rows,
    kp]` fp32 with `kp` a multiple of 128 >= k. `gran` = 128 for 128x128 weight blocks, 1 for 1x128 scales.
    """
    fns = _functions(library)
    if fns is None:
        return False
    xp, xs, sp, ss, op, os_ = _operands(x, sf, out)
    (rows, k), kp = x.shape, out.shape[1]
    fns[0](xp, rows, k, xs, row0, sp, ss, gran, op, os_, kp, _parts(rows, kp))
    return True


def decode_rows_t(x: torch.Tensor, sf: torch.Tensor, out: torch.Tensor, library=LIBRARY) -> bool:
    """`out[:k, r] = x[r].float() * sf[r]` per 128 columns (a transposed decode), `out[k:] = 0`; False if unavailable.

    `out [kp, rows]` fp32 with contiguous rows (any row stride >= rows).
    """
    fns = _functions(library)
    if fns is None:
        return False
    xp, xs, sp, ss, op, os_ = _operands(x, sf, out)
    (rows, k), kp = x.shape, out.shape[0]
    fns[1](xp, rows, k, xs, sp, ss, op, os_, kp, _parts(rows, kp))
    return True


def gemm_weight_left(
    a: torch.Tensor,
    sfa: torch.Tensor,
    b: torch.Tensor,
    sfb: torch.Tensor,
    gran: int,
    d: torch.Tensor,
    chunk: int,
    library=LIBRARY,
) -> bool:
    """`d.copy_(decoded a @ decoded b .T)` in one C call, for fp8 `a [m, k]` (1x128 scales `sfa`) and `b [n, k]`
    (scales `sfb` as `decode_rows`), `d [m, n]` bf16 with unit column stride; scales contiguous fp32.
    The threads decode `a` transposed, then take chunks of `chunk` weight rows: each decoded, multiplied by a
    one-thread MKL SGEMM (the weight as the left operand) and written transposed while in that core's cache.
    False when the library or MKL is unavailable."""
    fns, mkl = _functions(library), mkl_sgemm()
    if fns is None or mkl is None:
        return False
    (m, k), n = a.shape, b.shape[0]
    if d.shape != (m, n) or d.dtype != torch.bfloat16 or d.stride(1) != 1:
        raise ValueError(f"d: bf16 [m, n] with unit column stride expected, got {d.dtype} {tuple(d.shape)}")
    if b.shape[1] != k:
        raise ValueError(f"b: K = {k} expected, got {b.shape[1]}")
    kp = -(-k // 128) * 128
    at = torch.empty((kp, m), dtype=torch.float32)
    ap, as_, sap, sas, _, _ = _operands(a, sfa, at)
    bp, bs, sbp, sbs, _, _ = _operands(b, sfb, at)
    rc = fns[3](ap, m, as_, sap, sas, at.data_ptr(), bp, n, k, bs, sbp, sbs, gran, kp, d.data_ptr(), d.stride(0),
                chunk, torch.get_num_threads(), mkl)  # fmt: skip
    if rc != 0:
        raise MemoryError("seekstack.gemm: the C kernel could not allocate its buffers")
    return True


def bf16_transposed(src: torch.Tensor, dst: torch.Tensor, library=LIBRARY) -> bool:
    """`dst.copy_(src.T)` for fp32 `src [r, c]` and bf16 `dst [c, r]`, both with unit column stride, rounded as
    torch rounds (NaN stays NaN); False if unavailable. ~0.3 ns per element vs ~1.1 for torch's strided copy."""
    fns = _functions(library)
    if fns is None:
        return False
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16 or src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError(f"src: fp32 and dst: bf16 with unit column strides expected, got {src.dtype}, {dst.dtype}")
    if dst.shape != (src.shape[1], src.shape[0]):
        raise ValueError(f"dst: shape {tuple(dst.shape)} is not the transpose of src's {tuple(src.shape)}")
    fn, rows, cols = fns[2], src.shape[0], src.shape[1]
    sp, ss, dp, ds = src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0)
    fn(sp, rows, cols, ss, dp, ds, _parts(rows, cols))
    return True
