"""`Buffer`: DeepEP v1's communication buffer, on any torch.distributed backend (gloo on CPU, NCCL on GPUs).

>>> # inside an initialised process group (see seekstack.ep.demo for a runnable two-rank example):
>>> # buf = Buffer(dist.group.WORLD)
>>> # per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_idx, num_experts)
>>> # recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank,
>>> #     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=w)
>>> # combined, combined_w, _ = buf.combine(expert_out, handle, topk_weights=recv_w)
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from . import low_latency, normal
from .config import Config
from .events import EPCommError, EventOverlap
from .layout import compute_dispatch_layout
from .shared import SharedWindows

topk_idx_t = torch.int64

_DEFAULT_TIMEOUT_S = 300.0


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)  # private: where it is missing, outputs are never reused


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= s
    return n


def _storage_uses(t: torch.Tensor) -> int:
    """How many owners the storage of `t` has (tensors, storages), as counted by torch; -1 where torch can't say."""
    return -1 if _USE_COUNT is None else _USE_COUNT(t.untyped_storage()._cdata)


class Buffer:
    """Expert-parallel dispatch/combine over a process group (DeepEP v1 `Buffer`).

    `num_nvl_bytes`/`num_rdma_bytes` are validated and kept for API compatibility: the transports size their
    buffers per call. `timeout_s` bounds every wait on a collective, so a dead or mismatched peer raises
    `EPCommError` naming the step instead of hanging. Tensors may live on any device the group's backend moves
    (CPU for gloo, CUDA for NCCL). `transport` picks the wire of normal mode: `"shm"` (shared-memory windows,
    DeepEP's intranode path; the gloo default when every rank is on this host), `"p2p"` (per-peer isend/irecv,
    the gloo default otherwise) or `"all_to_all"` (one `all_to_all_single` per field, the default on every other
    backend). The shared windows are set up by the first normal-mode call (a collective, like the constructor of
    DeepEP's Buffer). On CPU the first large combine of a process compiles its sum (`seekstack.ep.fused_sum`,
    4-7 s, once), so a `timeout_s` below ~30 s may need `SEEKSTACK_CPU_COMPILE=off`.

    >>> Buffer.set_num_sms(24); Buffer.num_sms
    24
    """

    num_sms: int = 20

    def __init__(
        self,
        group=None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
        timeout_s: float | None = _DEFAULT_TIMEOUT_S,
        transport: str = "auto",
    ) -> None:
        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialised (call init_process_group first)")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_qps_per_rank <= 0:
            raise ValueError(f"num_qps_per_rank must be positive, got {num_qps_per_rank}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive or None, got {timeout_s}")
        if transport not in ("auto", "shm", "p2p", "all_to_all"):
            raise ValueError(f"transport must be 'auto', 'shm', 'p2p' or 'all_to_all', got {transport!r}")
        self.transport = transport
        self.group = group if group is not None else dist.group.WORLD
        self.backend = str(dist.get_backend(self.group))
        # Per-peer isend/irecv on gloo (own rows skip the wire and the staging copy); one all_to_all_single per
        # field elsewhere (NCCL: stream-ordered, no unmatched point-to-point calls).
        self.p2p = transport == "p2p" or (transport in ("auto", "shm") and self.backend == "gloo")
        # Shared-memory windows: tried on first use where asked for or (auto) on gloo; None = not (yet) set up.
        self._want_shared = transport == "shm" or (transport == "auto" and self.backend == "gloo")
        self._windows: SharedWindows | None = None
        self._shared_pending: EventOverlap | None = None
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self._ll_combine_buffers: dict[tuple, torch.Tensor] = {}
        self._ll_recv_buffers: dict[tuple, torch.Tensor] = {}
        self._ll_phase = 0
        # Staging memory of the normal-mode exchanges, kept across calls like DeepEP's registered buffers: fresh
        # multi-megabyte allocations cost page faults on CPU that are a large share of a loopback exchange.
        self._scratch: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, tuple[torch.Tensor, int]] = {}
        # Small per-call-invariant tables (e.g. global → local expert ids), keyed by what they depend on.
        self.constants: dict[tuple, torch.Tensor] = {}
        self._destroyed = False

    # ---- static helpers -------------------------------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SM budget of the normal kernels (kept for compatibility; must be even)."""
        if new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"new_num_sms must be a positive even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of the stream; on this transport it is already complete."""
        return EventOverlap()

    @staticmethod
    def is_sm90_compiled() -> bool:
        return False

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        if num_ranks <= 0:
            raise ValueError(f"num_ranks must be positive, got {num_ranks}")
        return Config(Buffer.num_sms, 4, 256, 6, 128)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of the fixed low-latency send+receive blocks: R * max_tokens rows each way, bf16 or fp8."""
        row = max(2 * hidden, hidden + 4 * (hidden // 128)) + 16
        return 2 * num_ranks * num_max_dispatch_tokens_per_rank * row

    def get_comm_stream(self):
        """Collectives run on the backend's own streams/threads; there is no separate stream object."""
        return None

    def destroy(self) -> None:
        if not self.explicitly_destroy:
            raise ValueError("explicitly_destroy: destroy() needs Buffer(..., explicitly_destroy=True)")
        self._ll_combine_buffers.clear()
        if self._windows is not None:
            self.settle_shared()
            self._windows.close()
            self._windows = None
        self._destroyed = True

    # ---- shared-memory windows (normal mode on one host) -----------------------------------------------------
    def shared_windows(self, device: torch.device) -> SharedWindows | None:
        """The shared windows for a call on `device`, set up on first use; None where this Buffer does not use
        them (another transport, or tensors off the CPU). With `transport="shm"` ranks that cannot share memory
        raise `EPCommError`; with "auto" they fall back to per-peer sends."""
        if not self._want_shared or device.type != "cpu":
            return None
        if not SharedWindows.supported():
            if self.transport == "shm":
                raise EPCommError("shared windows: this platform lacks memfd/pidfd (Linux >= 5.3 needed)")
            self._want_shared = False
            return None
        if self._windows is None:
            step = "shared windows: setup"
            self._windows = SharedWindows.open(self.group, self.rank, self.group_size, self.timeout, step)
            if self._windows is None:
                if self.transport == "shm":
                    raise EPCommError(f"{step}: the ranks cannot map each other's memory (not on one host?)")
                self._want_shared = False
                return None
        self.settle_shared()
        return self._windows

    def settle_shared(self) -> None:
        """Finish a deferred (async_finish) shared-window exchange: it reads the peers' windows, which they may
        rewrite once this rank has entered its next exchange."""
        pending, self._shared_pending = self._shared_pending, None
        if pending is not None:
            pending.current_stream_wait()

    def defer_shared(self, event: EventOverlap) -> None:
        """Record the event of an exchange whose reads are deferred until it is waited on."""
        self._shared_pending = None if event.is_completed() else event

    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this Buffer was destroyed")

    # ---- normal mode ----------------------------------------------------------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """`(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event)`."""
        self._check_alive()
        if previous_event is not None:
            previous_event.current_stream_wait()
        layout = compute_dispatch_layout(topk_idx, num_experts, self.group_size)
        return (*layout, EventOverlap())

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Send each token once to every rank holding one of its experts.

        `x` is `[T, H]` (bf16) or `(fp8 [T, H], fp32 scales [T, H/128])`. Returns `(recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)`: rows ordered by source rank, then source
        order; `recv_topk_idx` holds local expert ids (-1 elsewhere) and the matching weights are 0. With `handle`
        (a cached dispatch) only `recv_x` is produced. `num_worst_tokens > 0` pads the outputs to that many rows
        (top-k ids -1) and returns an empty list. With `async_finish` the outputs are valid after `event` waits.
        """
        self._check_alive()
        if config is not None and not isinstance(config, Config):
            raise ValueError("config must be a seekstack.ep.Config")
        if handle is not None and topk_idx is not None:
            raise ValueError("topk_idx: a cached dispatch (handle given) takes no topk_idx")
        if previous_event is not None:
            previous_event.current_stream_wait()
        return normal.dispatch(
            self,
            x,
            handle,
            num_tokens_per_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            async_finish,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle,
        topk_weights: torch.Tensor | None = None,
        bias=None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Return each token's copies to its source rank and add them (unweighted, fp32, rank order).

        Returns `(combined_x [T, H], combined_topk_weights | None, event)`; `bias` (one tensor or up to two) is
        added at the end.
        """
        self._check_alive()
        if config is not None and not isinstance(config, Config):
            raise ValueError("config must be a seekstack.ep.Config")
        if previous_event is not None:
            previous_event.current_stream_wait()
        return normal.combine(self, x, handle, topk_weights, bias, async_finish)

    # ---- low-latency mode -----------------------------------------------------------------------------------
    def _check_low_latency(self) -> None:
        self._check_alive()
        if not self.low_latency_mode:
            raise ValueError("low_latency_mode: create the Buffer with low_latency_mode=True")

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Zero the zero-copy combine buffer (buffers are otherwise allocated per call)."""
        self._check_low_latency()
        for buf in (*self._ll_combine_buffers.values(), *self._ll_recv_buffers.values()):
            buf.zero_()

    def take_scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
        """Staging tensor `name`, reused across calls; the caller returns it with `give_scratch` when done.

        Taking removes it from the pool, so two calls in flight at once (async_finish) never share one. Off the
        CPU there is no pool: the CUDA caching allocator already recycles memory, and it knows the streams.
        """
        nbytes = _nbytes(shape, dtype)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._scratch.pop(name, None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return buf[:nbytes].view(dtype).view(shape)

    def take_output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
        """An output tensor for the caller, in memory recycled from an earlier call once nothing else holds it.

        Receiving into freshly mapped pages costs a page fault per 4 KiB inside the transfer; a previous output
        whose storage no tensor (view, numpy array, ...) references any more is reused instead. Contents are stale.
        Off the CPU the caching allocator does this (and tracks streams), so a fresh tensor is returned.
        """
        nbytes = _nbytes(shape, dtype)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        base, idle = self._outputs.get(name, (None, 0))
        if base is None or base.numel() < nbytes or idle < 0 or _storage_uses(base) != idle:
            base = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._outputs[name] = (base, _storage_uses(base))
        return base[:nbytes].view(dtype).view(shape)

    def give_scratch(self, name: str, t: torch.Tensor) -> None:
        """Return a tensor from `take_scratch` to the pool (its whole storage)."""
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        self._scratch[name] = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage, 0, (storage.nbytes(),))

    def low_latency_recv_buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device=None
    ) -> torch.Tensor:
        """The buffer `name` of the current phase; two phases alternate, as in DeepEP."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (self._ll_phase, name, shape, dtype, device)
        if key not in self._ll_recv_buffers:
            self._ll_recv_buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._ll_recv_buffers[key]

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """Dispatch bf16 `x [T, H]` into the masked layout `[E_local, R * max_tokens, H]`.

        Returns `(recv_x | (fp8, scales), recv_count [E_local] int32, handle, event, hook)`. Rows of expert `e` are
        ordered by source rank, token and top-k slot; only the first `recv_count[e]` are valid. With fp8 the scales
        are per token per 128 channels (`[E_local, R*max, H/128]`, column-major in the last two dims). With
        `return_recv_hook` the receive completes when `hook()` is called, so work can run in between.
        """
        self._check_low_latency()
        if cumulative_local_expert_recv_stats is not None and cumulative_local_expert_recv_stats.dtype != torch.int32:
            raise ValueError("cumulative_local_expert_recv_stats must be int32 [num_local_experts]")
        self._ll_phase ^= 1
        return low_latency.dispatch(
            self,
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ):
        """Bring expert outputs `[E_local, R * max_tokens, H]` back, weighted: `Σ_k w[t,k] · y(t,k)` in bf16.

        Returns `(combined_x [T, H], event, hook)`. With `zero_copy`, the data is read from the tensor returned by
        `get_next_low_latency_combine_buffer(handle)` and `x` is ignored.
        """
        self._check_low_latency()
        if use_logfmt:
            raise ValueError("use_logfmt: the LogFMT wire format is not supported by this transport")
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        return low_latency.combine(self, x, topk_idx, topk_weights, handle, async_finish, return_recv_hook, out)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """The bf16 `[E_local, R * max_tokens, H]` tensor a zero-copy `low_latency_combine` reads from."""
        self._check_low_latency()
        h = low_latency.resolve_handle(handle)
        shape = (h.num_experts // self.group_size, self.group_size * h.num_max_dispatch_tokens_per_rank, h.hidden)
        key = (*shape, h.src_info.device)
        if key not in self._ll_combine_buffers:
            self._ll_combine_buffers[key] = torch.zeros(shape, dtype=torch.bfloat16, device=h.src_info.device)
        return self._ll_combine_buffers[key]
