"""`Config`: DeepEP's per-call tuning knobs.

DeepEP's kernels split work over SMs and chunk NVLink/RDMA traffic; here the transport is one packed
`all_to_all_single`, so the chunk sizes do not change results. The numbers are kept (and validated) so code written
for DeepEP runs unchanged, and the size hints say how many bytes the packed send and receive buffers need.

>>> cfg = Config(20, 6, 256, 6, 128)
>>> cfg.get_nvl_buffer_size_hint(7168 * 2, 8) > 0
True
"""

from __future__ import annotations

from dataclasses import dataclass

# Bytes of per-token metadata that travel with a token copy (top-k ids and weights, source index), rounded up.
_META_BYTES_PER_TOKEN = 256


@dataclass(frozen=True)
class Config:
    """Tuning knobs of one dispatch/combine call (DeepEP v1 `Config`).

    >>> Config(num_sms=24).num_sms
    24
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 128

    def __post_init__(self) -> None:
        if self.num_sms <= 0 or self.num_sms % 2:
            raise ValueError(f"num_sms must be a positive even number, got {self.num_sms}")
        for name in (
            "num_max_nvl_chunked_send_tokens",
            "num_max_nvl_chunked_recv_tokens",
            "num_max_rdma_chunked_send_tokens",
            "num_max_rdma_chunked_recv_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError("num_max_nvl_chunked_send_tokens must not exceed num_max_nvl_chunked_recv_tokens")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes for the intra-node staging buffers: one chunk ring per (channel, peer), as DeepEP sizes them."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError("hidden_bytes and num_ranks must be positive")
        channels = self.num_sms // 2
        per_token = hidden_bytes + _META_BYTES_PER_TOKEN
        return channels * num_ranks * self.num_max_nvl_chunked_recv_tokens * per_token

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes for the inter-node staging buffers; 0 within one node (at most 8 ranks)."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError("hidden_bytes and num_ranks must be positive")
        if num_ranks <= 8:
            return 0
        channels = self.num_sms // 2
        per_token = hidden_bytes + _META_BYTES_PER_TOKEN
        return 2 * channels * (num_ranks // 8) * self.num_max_rdma_chunked_recv_tokens * per_token
