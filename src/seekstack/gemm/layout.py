"""Layout helpers with DeepGEMM's names: alignment of the contiguous grouped layout and TMA-aligned scale tensors.

DeepGEMM wants activation scales "TMA-aligned and transposed": column-major, with the M axis padded to a multiple of
16 bytes. Every GEMM here accepts such tensors (they are ordinary strided views) as well as plain row-major ones.

>>> sf = torch.rand(7, 3)
>>> t = get_col_major_tma_aligned_tensor(sf)
>>> t.shape, t.stride(), torch.equal(t, sf)
(torch.Size([7, 3]), (1, 8), True)
"""

from __future__ import annotations

import torch

# Rows of one group in the contiguous grouped layout are padded to this many (DeepGEMM's legacy M alignment).
_MK_ALIGNMENT = 128
_NUM_SMS: int | None = None


def ceil_div(x: int, y: int) -> int:
    """`ceil(x / y)` for non-negative integers."""
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """`x` rounded up to a multiple of `y`."""
    return ceil_div(x, y) * y


def get_m_alignment_for_contiguous_layout() -> int:
    """Row alignment of each group in the M-grouped contiguous layout (128), DeepGEMM's V1 name."""
    return _MK_ALIGNMENT


def get_mk_alignment_for_contiguous_layout() -> int:
    """Current DeepGEMM name of `get_m_alignment_for_contiguous_layout`."""
    return _MK_ALIGNMENT


def set_mk_alignment_for_contiguous_layout(value: int) -> None:
    """Set the contiguous-layout alignment (must be a positive multiple of 16; 128 is DeepGEMM's default)."""
    global _MK_ALIGNMENT
    if not isinstance(value, int) or value <= 0 or value % 16:
        raise ValueError(f"value: alignment must be a positive multiple of 16, got {value!r}")
    _MK_ALIGNMENT = value


def set_num_sms(num_sms: int) -> None:
    """Accepted for API compatibility; the Triton kernels here launch one program per output tile."""
    global _NUM_SMS
    if not isinstance(num_sms, int) or num_sms <= 0:
        raise ValueError(f"num_sms: must be a positive int, got {num_sms!r}")
    _NUM_SMS = num_sms


def get_num_sms() -> int:
    """The SM count set by `set_num_sms`, else the device's (or the CPU count without CUDA)."""
    if _NUM_SMS is not None:
        return _NUM_SMS
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    import os

    return os.cpu_count() or 1


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """`x` rounded up so that `x * element_size` is a multiple of 16 bytes (TMA's requirement).

    >>> get_tma_aligned_size(7, 4)
    8
    """
    if element_size <= 0 or 16 % element_size:
        raise ValueError(f"element_size: must divide 16, got {element_size}")
    return align(x, 16 // element_size)


def get_col_major_tma_aligned_tensor(x: torch.Tensor) -> torch.Tensor:
    """The same values as `x` ([m, k] or [g, m, k], fp32) stored column-major with M padded to 16 bytes.

    The result has `x`'s shape and strides `(1, aligned_m)` (`(aligned_m * k, 1, aligned_m)` when batched).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"x: expected a 2-D or 3-D scale tensor, got shape {tuple(x.shape)}")
    squeeze = x.dim() == 2
    xb = x.unsqueeze(0) if squeeze else x
    g, m, k = xb.shape
    aligned_m = get_tma_aligned_size(m, x.element_size())
    if xb.stride(1) == 1 and xb.stride(2) == aligned_m and (g == 1 or xb.stride(0) == aligned_m * k):
        return x
    out = torch.empty((g, k, aligned_m), dtype=x.dtype, device=x.device).transpose(1, 2)[:, :m, :]
    out.copy_(xb)
    return out[0] if squeeze else out


# DeepGEMM's current name for the same helper.
get_mn_major_tma_aligned_tensor = get_col_major_tma_aligned_tensor
