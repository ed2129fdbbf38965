"""Expert-parallel dispatch and combine with DeepEP's v1 `Buffer` API, on any torch.distributed backend.

Normal mode (`dispatch`/`combine`) for training and prefill, low-latency mode (`low_latency_dispatch`/
`low_latency_combine`) into the masked `[E_local, R * max_tokens, H]` layout for decoding, asynchronous events and
receive hooks, and autograd functions. The wire is one send per peer on gloo and one `all_to_all_single` per field
elsewhere (fp8 as uint8 views), so it runs on gloo with CPU tensors as well as NCCL with CUDA tensors, and results
are bit-identical to a plain all_to_all_single reference (`seekstack.ep.reference`).
"""

from .autograd import EPCombine, EPDispatch, combine_with_grad, dispatch_with_grad
from .buffer import Buffer, topk_idx_t
from .config import Config
from .events import EPCommError, EventOverlap
from .fp8 import per_token_cast_back, per_token_cast_to_fp8
from .layout import compute_dispatch_layout
from .low_latency import LowLatencyHandle
from .routing import DispatchHandle

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EPCombine",
    "EPCommError",
    "EPDispatch",
    "EventOverlap",
    "LowLatencyHandle",
    "combine_with_grad",
    "compute_dispatch_layout",
    "dispatch_with_grad",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "topk_idx_t",
]
