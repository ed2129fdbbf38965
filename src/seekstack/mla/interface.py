"""`flash_mla_with_kvcache`: FlashMLA's decoding API, checked once here and dispatched to a backend.

Backends: "reference" (plain fp32 PyTorch, one request at a time), "cpu" (vectorised PyTorch with bounded memory,
chosen on CPU) and "triton" (split-KV + combine kernels, chosen on CUDA; runs in Triton's interpreter on CPU tensors).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from seekstack.mla.fp8_cache import FP8_CACHE_DTYPES, fp8_bytes_per_token

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("reference", "cpu", "triton")


@dataclass
class DecodeProblem:
    """Validated arguments plus the derived sizes every backend needs."""

    q: torch.Tensor  # [b, s_q, h_q, d]
    k_cache: torch.Tensor  # [num_blocks, page, h_kv, d] (or [..., fp8 bytes])
    block_table: torch.Tensor | None  # int32 [b, max_blocks]
    cache_seqlens: torch.Tensor | None  # int32 [b]
    indices: torch.Tensor | None  # int32 [b, s_q, topk]: cache slots (block * page + offset), -1 = skip
    head_dim_v: int
    softmax_scale: float
    causal: bool  # effective: only when s_q > 1 and dense
    is_fp8: bool

    @property
    def b(self) -> int:
        return self.q.shape[0]

    @property
    def s_q(self) -> int:
        return self.q.shape[1]

    @property
    def h_q(self) -> int:
        return self.q.shape[2]

    @property
    def d(self) -> int:
        return self.q.shape[3]

    @property
    def num_blocks(self) -> int:
        return self.k_cache.shape[0]

    @property
    def page(self) -> int:
        return self.k_cache.shape[1]

    @property
    def h_kv(self) -> int:
        return self.k_cache.shape[2]

    @property
    def group(self) -> int:
        return self.h_q // self.h_kv

    @property
    def sparse(self) -> bool:
        return self.indices is not None

    @property
    def num_requests(self) -> int:
        """Scheduled requests: b, or b * s_q for sparse decoding (each query token has its own slots)."""
        return self.b * self.s_q if self.sparse else self.b

    @property
    def rows(self) -> int:
        """Query rows sharing one KV head within a request: s_q * h_q / h_kv (h_q / h_kv when sparse)."""
        return self.group if self.sparse else self.s_q * self.group


def _check_tensor(name: str, t, dim: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def validate(
    q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False, is_fp8_kvcache=False,
    indices=None, check_values=True,
) -> DecodeProblem:  # fmt: skip
    """Check shapes, dtypes, devices and index ranges; raise ValueError naming the offending argument.

    The range checks read tensor values (one host sync on a GPU); `check_values=False` skips them, and they are
    skipped while a CUDA graph is being captured."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [b, s_q, h_q, d], got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    device = q.device
    b, s_q, h_q, d = q.shape
    if s_q < 1 or h_q < 1 or d < 1:
        raise ValueError(f"q has an empty dimension: shape {tuple(q.shape)}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 1 <= head_dim_v <= d:
        raise ValueError(f"head_dim_v must be an int in [1, d={d}], got {head_dim_v!r}")
    k_cache = _check_tensor("k_cache", k_cache, 4, device)
    if is_fp8_kvcache:
        if k_cache.dtype not in FP8_CACHE_DTYPES:
            raise ValueError(f"k_cache: FP8 cache must be float8_e4m3fn, uint8 or int8, got {k_cache.dtype}")
        nbytes = fp8_bytes_per_token(d, head_dim_v)
        if k_cache.shape[-1] != nbytes:
            raise ValueError(f"k_cache: FP8 cache needs {nbytes} bytes per token for d={d}, head_dim_v={head_dim_v}")
    else:
        if k_cache.dtype != q.dtype:
            raise ValueError(f"k_cache dtype {k_cache.dtype} does not match q dtype {q.dtype}")
        if k_cache.shape[-1] != d:
            raise ValueError(f"k_cache head dim {k_cache.shape[-1]} does not match q head dim {d}")
    num_blocks, page, h_kv, _ = k_cache.shape
    if page < 1 or h_kv < 1:
        raise ValueError(f"k_cache has an empty dimension: shape {tuple(k_cache.shape)}")
    if h_q % h_kv:
        raise ValueError(f"q heads (h_q={h_q}) must be a multiple of k_cache heads (h_kv={h_kv})")
    scale = d**-0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")

    checks: list[tuple[str, torch.Tensor]] = []  # (message, bool tensor) evaluated with one host sync
    if indices is not None:
        indices = _check_tensor("indices", indices, 3, device)
        if indices.dtype != torch.int32:
            raise ValueError(f"indices must be int32, got {indices.dtype}")
        if indices.shape[:2] != (b, s_q) or indices.shape[2] < 1:
            raise ValueError(f"indices must have shape [b={b}, s_q={s_q}, topk>=1], got {tuple(indices.shape)}")
        if causal and s_q > 1:
            raise ValueError("causal must be False with indices (sparse decoding has no causal mask)")
        if indices.numel():
            out_of_range = ((indices < -1) | (indices >= num_blocks * page)).any()
            checks.append((f"indices must be -1 or a cache slot in [0, {num_blocks * page})", out_of_range))
        block_table = cache_seqlens = None
    else:
        block_table = _check_tensor("block_table", block_table, 2, device)
        cache_seqlens = _check_tensor("cache_seqlens", cache_seqlens, 1, device)
        if block_table.dtype != torch.int32:
            raise ValueError(f"block_table must be int32, got {block_table.dtype}")
        if cache_seqlens.dtype != torch.int32:
            raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
        if block_table.shape[0] != b:
            raise ValueError(f"block_table has {block_table.shape[0]} rows but q has batch size {b}")
        if cache_seqlens.shape[0] != b:
            raise ValueError(f"cache_seqlens has {cache_seqlens.shape[0]} entries but q has batch size {b}")
        if b:
            capacity = block_table.shape[1] * page
            checks.append(("cache_seqlens must be >= 0", (cache_seqlens < 0).any()))
            too_long = (cache_seqlens > capacity).any()
            checks.append((f"cache_seqlens exceeds the block_table capacity ({capacity} tokens)", too_long))
            used_blocks = (cache_seqlens.long() + page - 1) // page
            used = torch.arange(block_table.shape[1], device=device) < used_blocks[:, None]
            bad = used & ((block_table < 0) | (block_table >= num_blocks))
            checks.append((f"block_table has a block id outside [0, {num_blocks}) in a used entry", bad.any()))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if checks and check_values and not capturing:
        flags = torch.stack([c for _, c in checks]).tolist()
        for (message, _), failed in zip(checks, flags):
            if failed:
                raise ValueError(message)
    return DecodeProblem(
        q=q,
        k_cache=k_cache,
        block_table=block_table,
        cache_seqlens=cache_seqlens,
        indices=indices,
        head_dim_v=head_dim_v,
        softmax_scale=scale,
        causal=bool(causal) and s_q > 1 and indices is None,
        is_fp8=bool(is_fp8_kvcache),
    )


def _triton_available() -> bool:
    try:  # without importing it: the interpreter must be configured first (see triton_decode.py)
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and _triton_available() else "cpu"


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor | None = None,
    num_splits: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
    *,
    backend: str | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLA decoding over a paged latent KV cache, FlashMLA's classic interface.

    Arguments (FlashMLA's shapes):
      q [b, s_q, h_q, d]; k_cache [num_blocks, block_size, h_kv, d] in q's dtype, or the FP8 layout
      [..., 656] with `is_fp8_kvcache`; block_table int32 [b, max_blocks]; cache_seqlens int32 [b];
      head_dim_v: V is the first `head_dim_v` columns of each cached vector; tile_scheduler_metadata and
      num_splits from `get_mla_metadata` (computed here when None; only the Triton backend uses them);
      softmax_scale (default d ** -0.5); causal: bottom-right mask when s_q > 1; indices int32 [b, s_q, topk] of
      cache slots (block_id * block_size + offset, -1 = skip) for sparse decoding, where block_table and
      cache_seqlens are ignored.
    Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, softmax_lse fp32 [b, h_q, s_q], natural log); a query
    with nothing to attend gets out = 0 and lse = +inf.
    `backend`: None picks "triton" on CUDA and "cpu" otherwise; "reference" is the plain fp32 oracle.
    `check_values=False` skips the checks that read tensor values (block ids, lengths, indices in range), which
    cost one host sync per call on a GPU; shapes, dtypes and devices are always checked.

    >>> import torch
    >>> from seekstack.mla import get_mla_metadata
    >>> b, h_q, s_k, page = 2, 16, 100, 16
    >>> q = torch.randn(b, 1, h_q, 576, dtype=torch.bfloat16)
    >>> k_cache = torch.randn(16, page, 1, 576, dtype=torch.bfloat16)
    >>> block_table = torch.randperm(16, dtype=torch.int32).view(b, 8)
    >>> seqlens = torch.tensor([s_k, 37], dtype=torch.int32)
    >>> meta, splits = get_mla_metadata(seqlens, 1 * h_q // 1, 1)
    >>> out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, meta, splits, causal=True)
    >>> out.shape, lse.shape
    (torch.Size([2, 1, 16, 512]), torch.Size([2, 16, 1]))
    """
    p = validate(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, is_fp8_kvcache, indices, check_values
    )
    backend = default_backend(q.device) if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if p.b == 0:
        return (
            q.new_zeros(0, p.s_q, p.h_q, head_dim_v),
            torch.zeros(0, p.h_q, p.s_q, dtype=torch.float32, device=q.device),
        )
    if backend == "reference":
        from seekstack.mla.reference import mla_decode_reference

        return mla_decode_reference(
            p.q, p.k_cache, p.block_table, p.cache_seqlens, head_dim_v, p.softmax_scale, p.causal, p.is_fp8, p.indices
        )
    if backend == "cpu":
        from seekstack.mla.cpu import mla_decode_cpu

        return mla_decode_cpu(p)
    from seekstack.mla.triton_decode import mla_decode_triton

    return mla_decode_triton(p, tile_scheduler_metadata, num_splits)
