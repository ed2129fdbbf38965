"""Vectorised PyTorch MLA decoding with bounded memory: the path chosen on CPU.

Problems go first to the C kernel (`seekstack.mla.native`: bf16 / fp16 / fp32 or FP8 caches, dense or sparse; 2-40x
faster: it keeps a tile of keys in cache across both products and the softmax); this path takes the rest (head dims
the kernel does not tile, no compiler or AVX-512) and is tested on every case on its own (`native=False`).

`cpu_plan.make_plan` sorts the requests by length and cuts the work into steps of at most `tokens_per_step` keys:
short requests of similar length share a step, a long one is cut into equal chunks. A step gathers its pages (or
sparse slots) into one fp32 keys tile that serves both matmuls: scores = keys q^T over all d columns (the softmax
scale applied by the matmul), out = P^T V with V the tile's first dv columns. At most one step of keys exists at a
time. The chunks of a long request are attended one after another with an online softmax (running max and sum,
earlier sums rescaled); a request that fits in one step needs none. Pages that are consecutive in the cache are
read in place, with no gather.

With 2 or more torch threads the steps run in lanes: worker threads of one torch thread each take the costliest
unit left (a short-request step, or all chunks of a long request), since MKL splits these small-M matmuls poorly
over cores (see `_lane_units`). Each lane has its own buffers; results go to disjoint rows.

Layout inside: rows = s_q * h_q / h_kv query rows share each KV head (FlashMLA's "M"); a step's keys are
[requests, h_kv, keys, d] and its scores [requests, h_kv, keys, rows].

Where a key's time goes at h_q = 16, s_q = 1 (2-core Xeon, avx512, torch 2.13; one thread, thread time): the two
matmuls ~370 ns (MKL reaches ~110 GFLOP/s with 16 rows, 165 on large squares), gathering its bf16 page rows ~150 ns
(cache rows come from DRAM), widening them to fp32 ~150 ns (PyTorch's CPU matmul has no bf16-in/fp32-out form,
and a bf16 matmul rounds the scores to bf16), softmax and masks ~60 ns. At h_q = 128 the matmuls take ~75 %.
"""

from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from seekstack.mla.cpu_plan import Group, make_plan
from seekstack.mla.fp8_cache import TILE, fp8_cache_views
from seekstack.mla.interface import DecodeProblem

# Keys per step: 2048 (4.7 MB of fp32 keys at d = 576). On the Xeon above, 1024 and 4096 ran within 3 % of it and
# 512 ~30 % slower (the per-step Python and op overhead).
DEFAULT_TOKENS_PER_STEP = 2048
# Steps with more requests than this mask padding with one vectorised mask, fewer request by request: at b = 16,
# s_k = 256 a masked_fill_ with a mask broadcast over d cost ~5x the per-request fill_ calls (~3 us each).
ITEM_LOOP_MAX = 16
FLOAT_MIN = torch.finfo(torch.float32).min
# A step costs ~80 us of Python and per-op overhead; a key ~330 ns (gather, widen, masks) plus ~9 ns per query
# row (matmuls, softmax). A request joins a group only when the padding it brings costs less than a step.
STEP_OVERHEAD_S, KEY_COST_S, KEY_ROW_COST_S = 80e-6, 330e-9, 9e-9
# At most this many query rows (requests x M) per step: bounds the per-thread query and output buffers (~20 MB at
# d = 576) when many short requests would otherwise share a step.
MAX_STEP_ROWS = 8192

# Lanes (see _lane_units) are used unless one unit holds more than this share of the estimated work: 2 lanes then
# take at least that share of the single-lane time, while 2 threads in each op take ~55-65 % of it.
LANE_MAX_SHARE = 0.6
# ... and unless the whole call is small (cost model above): at h_q = 16, b = 16, s_k = 256 (2-3 ms estimated) lanes
# ran at 11-13 % (s_q = 1) and 16-18 % (s_q = 2) of the roofline against 14 % and 22 % without (the hand-off, and
# the lanes' per-op overhead under the GIL). h_q = 128 at s_k = 256 (~6 ms) and h_q = 16 at 1024 (~8 ms) gain.
LANE_MIN_COST_S = 5e-3

_workspace = threading.local()
_all_workspaces: list[dict] = []  # every thread's buffers, for workspace_sizes / clear_workspace
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def workspace_sizes() -> dict[str, int]:
    """The largest per-thread buffer of each name (elements), over the threads that have run the CPU path."""
    sizes: dict[str, int] = {}
    with _executor_lock:
        for store in _all_workspaces:
            for (name, *_), buf in list(store.items()):
                sizes[name] = max(sizes.get(name, 0), buf.numel())
    return sizes


def clear_workspace() -> None:
    """Drop every thread's buffers (they regrow on the next call)."""
    with _executor_lock:
        for store in _all_workspaces:
            store.clear()


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A view into a per-thread buffer that only grows (to one step's worth). Fresh multi-MB allocations are mmap'd and
    page-fault on first touch: converting bf16 keys into a new tensor costs 1.8 ns/element here, into a reused one
    0.22 ns/element."""
    numel = 1
    for s in shape:
        numel *= s
    key = (name, dtype, device)
    store = getattr(_workspace, "buffers", None)
    if store is None:
        store = _workspace.buffers = {}
        with _executor_lock:
            _all_workspaces.append(store)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
        store[key] = buf
    return buf[:numel].view(shape)


class _Decode:
    """One call's state: the plan, the block ids, where results go."""

    def __init__(self, p: DecodeProblem, tokens_per_step: int):
        self.p = p
        device = self.device = p.q.device
        b, s_q, d, h, g, page = p.b, p.s_q, p.d, p.h_kv, p.group, p.page
        R, M = p.num_requests, p.rows
        if p.sparse:
            q_rows = p.q.reshape(R, h, M, d)
            self.slots = p.indices.reshape(R, -1)
            lengths = [self.slots.shape[1]] * R
            step = tokens_per_step
        else:
            q_rows = p.q.view(b, s_q, h, g, d).permute(0, 2, 1, 3, 4)  # [b, h_kv, s_q, group, d]
            lengths = p.cache_seqlens.tolist()
            step = max(page, tokens_per_step // page * page)  # dense steps gather whole pages
        pad_limit = int(STEP_OVERHEAD_S / (KEY_COST_S + KEY_ROW_COST_S * M))
        plan = self.plan = make_plan(lengths, step, 1 if p.sparse else page, pad_limit, max(1, MAX_STEP_ROWS // M))
        self.order = torch.tensor(plan.order, device=device)

        self.q_rows = q_rows  # [R, h_kv, s_q, group, d] (dense) or [R, h_kv, M, d] (sparse), request order
        self.q_of = None  # (r0, r1) whose queries the "q" buffer holds
        self.lse = torch.empty(R, h, M, dtype=torch.float32, device=device)
        self.out = torch.empty(b, s_q, p.h_q, p.head_dim_v, dtype=p.q.dtype, device=device)
        # Results by request: [R, h_kv, M, dv] views of `out` (rows are not contiguous when dense with s_q > 1).
        dv = p.head_dim_v
        self.out_rows = (
            self.out.view(R, h, M, dv) if p.sparse else self.out.view(b, s_q, h, g, dv).permute(0, 2, 1, 3, 4)
        )

        # Row m (query token m // group) of a request with `rem` keys left sees keys [0, rem - shift[m]).
        row_token = torch.arange(M, device=device) // g
        self.shift = (s_q - 1 - row_token) if p.causal else torch.zeros(M, dtype=torch.long, device=device)
        self.max_shift = s_q - 1 if p.causal else 0
        # The last s_q - 1 keys of a request, as seen by each row: hidden[t, m] = key rem - (s_q - 1) + t is hidden.
        self.tail_hidden = torch.arange(s_q - 1, device=device)[:, None] >= row_token if p.causal else None
        self.positions = torch.arange(max((grp.length for grp in plan.groups), default=0), device=device)
        # A row can see no key in a step: sparse rows whose slots are all -1, or causal rows of a step that ends fewer
        # than s_q keys before its request does.
        self.empty_rows = p.sparse or (p.causal and any(min(grp.rems) < s_q for grp in plan.groups))

        self.flat_cache = p.k_cache.flatten(0, 1) if p.k_cache.stride(0) == page * p.k_cache.stride(1) else None
        if not p.sparse:
            self.blocks, self.runs = _block_ids(p, plan, lengths, self.order, self.flat_cache is not None)
        self.acc_o = self.acc_max = self.acc_denom = None  # a long request's chunks so far: sum P V, max, sum P

    def gather(self, n_group: int, grp: Group) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The group's keys as an fp32 tile [G, h_kv, L, d], and (sparse only) which slots are valid [G, L]."""
        p, device, page, h = self.p, self.device, self.p.page, self.p.h_kv
        G, L = grp.r1 - grp.r0, grp.length
        valid = None
        if p.sparse:
            slot = self.slots[self.order[grp.r0 : grp.r1], grp.start : grp.start + L]
            valid = slot >= 0
            slot = slot.clamp_min(0)
            if self.flat_cache is not None:
                rows = _buffer("rows", (G * L, *self.flat_cache.shape[1:]), self.flat_cache.dtype, device)
                torch.index_select(self.flat_cache, 0, slot.reshape(-1).long(), out=rows)
            else:
                rows = p.k_cache[slot // page, slot % page]
        elif n_group in self.runs:  # the chunk's pages are consecutive in the cache: read them in place
            first = self.runs[n_group] * page
            rows = self.flat_cache[first : first + L]
        else:
            p0, n_pages = grp.start // page, -(-L // page)
            ids = self.blocks[grp.r0 : grp.r1, p0 : p0 + n_pages].reshape(-1)
            rows = _buffer("rows", (G * n_pages, *p.k_cache.shape[1:]), p.k_cache.dtype, device)
            torch.index_select(p.k_cache, 0, ids, out=rows)
            rows = rows.view(G, n_pages * page, h, -1)[:, :L]
        keys = _buffer("keys", (G, h, L, p.d), torch.float32, device)
        _to_fp32(p, rows.reshape(G, L, h, -1).transpose(1, 2), keys)
        if valid is not None and bool(valid.all()):
            valid = None
        return keys, valid

    def attend(self, n_group: int, grp: Group) -> None:
        p, device = self.p, self.device
        G, L, r0, r1 = grp.r1 - grp.r0, grp.length, grp.r0, grp.r1
        h, M, d, dv = p.h_kv, p.rows, p.d, p.head_dim_v
        keys, valid = self.gather(n_group, grp)
        padded = [j for j, n in enumerate(grp.lens) if n < L]
        loop = (G if p.causal else len(padded)) <= ITEM_LOOP_MAX  # the causal mask touches every item
        # Padding (shorter items, skipped sparse slots) may hold anything, even NaN: zero it so that P = 0 there
        # gives 0 (its scores are masked below).
        if valid is not None:
            keys.masked_fill_(~valid[:, None, :, None], 0.0)
        elif padded and loop:
            for j in padded:
                keys[j, :, grp.lens[j] :].zero_()
        elif padded:
            lo = grp.lens[-1]
            lens = torch.tensor(grp.lens, device=device)
            keys[:, :, lo:].masked_fill_((self.positions[lo:L] >= lens[:, None])[:, None, :, None], 0.0)

        # Scores as [items, h_kv, keys, rows]: keys @ q^T runs 10-50 % faster than q @ keys^T for M <= 128 (MKL,
        # one thread), softmax reduces over the keys, and P V takes P transposed at no cost.
        scores = _buffer("scores", (G, h, L, M), torch.float32, device)
        keys3, scores3 = keys.view(G * h, L, d), scores.view(G * h, L, M)
        q_t = self.queries(r0, r1).view(G * h, M, d).transpose(1, 2)
        torch.baddbmm(scores3, keys3, q_t, beta=0, alpha=p.softmax_scale, out=scores3)  # the scale for free
        self.mask(grp, scores, valid, padded, loop)

        row_max = _max_over_keys(scores)  # [G, h_kv, 1, M]
        if self.empty_rows:
            row_max.clamp_(min=FLOAT_MIN)  # a row with no key: exp(-inf - finite) = 0 below, not NaN
        later_chunk = grp.chunk and grp.start > 0
        if later_chunk:
            row_max = torch.maximum(self.acc_max, row_max)  # the running max over the request's chunks
        scores.sub_(row_max)
        probs = _buffer("probs", (G, h, L, M), torch.float32, device)
        torch.exp(scores, out=probs)  # out of place: ~2x faster than exp_ here
        denom = probs.sum(dim=-2, keepdim=True)  # [G, h_kv, 1, M]; >= 1 wherever a key was seen
        p_t, values3 = probs.view(G * h, L, M).transpose(1, 2), keys3[..., :dv]  # V: the keys' first dv columns
        if later_chunk:  # flash-attention style: rescale what the earlier chunks summed, add this one
            o = self.acc_o
            alpha = torch.exp(self.acc_max - row_max)
            o.mul_(alpha.transpose(-1, -2))
            torch.baddbmm(o.view(h, M, dv), p_t, values3, out=o.view(h, M, dv))
            denom = self.acc_denom.mul_(alpha).add_(denom)
        else:
            o = _buffer("acc_o" if grp.chunk else "o", (G, h, M, dv), torch.float32, device)
            torch.bmm(p_t, values3, out=o.view(G * h, M, dv))
        if grp.chunk and grp.lens[0] < grp.rems[0]:  # more chunks of this request to come
            self.acc_o, self.acc_max, self.acc_denom = o, row_max, denom
            return
        lse = torch.log(denom).add_(row_max).squeeze(-2)  # [G, h_kv, M]
        if self.empty_rows:
            denom.clamp_(min=1e-30)
        o.mul_(denom.reciprocal_().transpose(-1, -2))  # ~2x faster than div_ here
        self.write(r0, r1, o, lse)

    def queries(self, r0: int, r1: int) -> torch.Tensor:
        """The queries of sorted requests [r0, r1) in fp32, [G, h_kv, M, d]; kept while a long request's chunks
        go by."""
        p = self.p
        G = r1 - r0
        q = _buffer("q", (G, p.h_kv, p.rows, p.d), torch.float32, self.device)
        if self.q_of != (r0, r1):
            if G == 1:
                src = self.q_rows[self.plan.order[r0]][None]
            else:
                src = self.q_rows.index_select(0, self.order[r0:r1])
            q.view(src.shape).copy_(src)
            self.q_of = (r0, r1)
        return q

    def mask(self, grp: Group, scores: torch.Tensor, valid, padded: list[int], loop: bool) -> None:
        """-inf in scores [G, h_kv, L, M] where a row must not look: skipped sparse slots, padding, and (causal)
        the last s_q - 1 keys of a request for the earlier query tokens."""
        if valid is not None:
            scores.masked_fill_(~valid[:, None, :, None], float("-inf"))
            return
        L = grp.length
        if loop:
            for j in padded:
                scores[j, :, grp.lens[j] :] = float("-inf")
            if self.tail_hidden is not None:
                s_q1 = self.p.s_q - 1
                for j, rem in enumerate(grp.rems):
                    # The request's last s_q - 1 keys (rem - s_q1 .. rem of this step) may straddle two chunks:
                    # mask the part that falls in this one, [lo, hi).
                    tail = rem - s_q1
                    lo, hi = max(tail, 0), min(rem, grp.lens[j])
                    if lo < hi:
                        scores[j, :, lo:hi].masked_fill_(self.tail_hidden[lo - tail : hi - tail], float("-inf"))
            return
        lo = max(min(grp.rems) - self.max_shift, 0)  # keys before `lo` are seen by every row of every item
        if lo < L:
            rems = torch.tensor(grp.rems, device=self.device)
            hidden = self.positions[lo:L, None] >= (rems[:, None] - self.shift)[:, None, :]  # [G, L - lo, M]
            scores[:, :, lo:].masked_fill_(hidden[:, None], float("-inf"))

    def write(self, r0: int, r1: int, o: torch.Tensor, lse: torch.Tensor) -> None:
        """Store normalised fp32 outputs [G, h_kv, M, dv] of sorted requests [r0, r1) into `out` (request order)."""
        p = self.p
        self.lse[r0:r1] = lse
        o_rows = o if p.sparse else o.view(r1 - r0, p.h_kv, p.s_q, p.group, p.head_dim_v)
        if r1 - r0 <= ITEM_LOOP_MAX:  # copy_ converts on the fly: ~3x faster than index_copy_ (same dtype only)
            for j, r in enumerate(self.plan.order[r0:r1]):
                self.out_rows[r].copy_(o_rows[j])
        else:
            self.out_rows.index_copy_(0, self.order[r0:r1], o_rows.to(p.q.dtype))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        p, plan = self.p, self.plan
        lse = self.lse
        if plan.nonzero < p.num_requests:  # no keys: out = 0, lse = +inf
            self.out_rows.index_fill_(0, self.order[plan.nonzero :], 0.0)
            lse[plan.nonzero :] = float("inf")
        if self.empty_rows:
            lse.masked_fill_(lse == float("-inf"), float("inf"))
        lse = torch.empty_like(lse).index_copy_(0, self.order, lse)  # back to request order
        if p.sparse:
            lse = lse.reshape(p.b, p.s_q, p.h_q).transpose(1, 2)
        else:
            lse = lse.view(p.b, p.h_kv, p.s_q, p.group).permute(0, 1, 3, 2).reshape(p.b, p.h_q, p.s_q)
        return self.out, lse.contiguous()


def mla_decode_cpu(
    p: DecodeProblem, tokens_per_step: int = DEFAULT_TOKENS_PER_STEP, native: bool = True
) -> tuple[torch.Tensor, ...]:
    """(out [b, s_q, h_q, dv] in q's dtype, lse fp32 [b, h_q, s_q]) for a validated problem.

    `native`: use the C kernel (`seekstack.mla.native`) where it applies; False forces the PyTorch steps below."""
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    if native:
        from seekstack.mla import native as native_kernel

        result = native_kernel.decode(p)
        if result is not None:
            return result
    run = _Decode(p, tokens_per_step)
    threads = torch.get_num_threads()
    units = _lane_units(run.plan, p.rows) if threads > 1 and p.q.device.type == "cpu" else []
    if len(units) < 2:
        for n_group, grp in enumerate(run.plan.groups):
            run.attend(n_group, grp)
        return run.finish()
    # Each lane has its own accumulators and query cache (a shallow copy); results go to disjoint rows of out / lse.
    queue = deque(units)
    futures = [_pool(threads).submit(_lane, copy.copy(run), queue) for _ in range(min(threads, len(units)))]
    try:
        for f in futures:
            f.result()
    finally:
        # The lanes set one thread each, and torch.set_num_threads also sets MKL's process-wide count: restore it.
        torch.set_num_threads(threads)
    return run.finish()


def _lane_units(plan, rows: int) -> list[list[int]]:
    """The plan's groups as units of work for lanes, costliest first (a long request's chunks form one unit, in
    order); [] when one unit holds so much of the work that lanes would not pay.

    Why lanes: MKL splits one fp32 matmul at the decode's shapes poorly over 2 cores. Keys [414, 576] x q^T [576, 128]
    runs at 0.24 TFLOP/s on 2 threads but 0.15-0.17 on each of 2 single-threaded lanes (0.30-0.33 together, the
    2048^2 square's rate on 2 threads); at [2048, 576] x [576, 128] 0.30 against 0.33. Lanes also run the
    single-threaded parts (index_select, the bf16/fp32 conversions, per-op overhead) side by side."""
    units: list[tuple[float, list[int]]] = []
    for n, grp in enumerate(plan.groups):
        cost = STEP_OVERHEAD_S + (grp.r1 - grp.r0) * grp.length * (KEY_COST_S + KEY_ROW_COST_S * rows)
        if grp.chunk and grp.start > 0:  # a later chunk of the request the previous unit holds
            units[-1] = (units[-1][0] + cost, units[-1][1] + [n])
        else:
            units.append((cost, [n]))
    units.sort(key=lambda u: -u[0])
    total = sum(c for c, _ in units)
    if len(units) < 2 or units[0][0] > LANE_MAX_SHARE * total or total < LANE_MIN_COST_S:
        return []
    return [groups for _, groups in units]


def _lane(run: _Decode, queue: deque) -> None:
    """Attend units from the shared queue until it is empty: the lane that is free takes the next costliest unit, so
    lanes stay balanced whatever a neighbour's load does to one of them."""
    torch.set_num_threads(1)  # this thread's OpenMP count, and MKL's (restored by the caller)
    while True:
        try:
            groups = queue.popleft()
        except IndexError:
            return
        for n in groups:
            run.attend(n, run.plan.groups[n])


def _pool(threads: int) -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None or _executor._max_workers != threads:
            if _executor is not None:
                _executor.shutdown(wait=False)
            _executor = ThreadPoolExecutor(threads, thread_name_prefix="seekstack-mla")
        return _executor


def _max_over_keys(scores: torch.Tensor) -> torch.Tensor:
    """scores [G, h_kv, L, M] -> max over the L keys, [G, h_kv, 1, M]. With M < 32 amax over dim -2 runs ~10x
    slower (3 ns/element, one AVX-512 vector a row), so rows are first folded k at a time into >= 32 columns."""
    G, h, L, M = scores.shape
    k = -(-32 // M)
    if k == 1 or L < 2 * k:
        return scores.amax(dim=-2, keepdim=True)
    main = L - L % k
    out = scores[:, :, :main].reshape(G, h, main // k, k * M).amax(dim=-2).view(G, h, k, M).amax(dim=-2, keepdim=True)
    if main < L:
        torch.maximum(out, scores[:, :, main:].amax(dim=-2, keepdim=True), out=out)
    return out


def _block_ids(p: DecodeProblem, plan, lengths: list[int], order: torch.Tensor, flat: bool):
    """(block ids [R, max_blocks] in sorted order with every unused entry set to 0, so any page a group pads with is
    in range; {group: first block} for single-request groups whose pages are consecutive in the cache, read in
    place with no gather)."""
    device, page = p.q.device, p.page
    table = p.block_table.index_select(0, order)
    used = torch.tensor([-(-lengths[r] // page) for r in plan.order], device=device)
    in_use = torch.arange(table.shape[1], device=device) < used[:, None]
    blocks = torch.where(in_use, table, 0).long()
    runs: dict[int, int] = {}
    single = [n for n, grp in enumerate(plan.groups) if grp.r1 - grp.r0 == 1] if flat else []
    if single and table.shape[1] > 0:
        # breaks[r, c]: how many of pages 1..c of request r do not follow their predecessor in the cache
        breaks = torch.zeros_like(blocks)
        breaks[:, 1:] = torch.cumsum(blocks[:, 1:] != blocks[:, :-1] + 1, dim=1)
        req = torch.tensor([plan.groups[n].r0 for n in single], device=device)
        first = torch.tensor([plan.groups[n].start // page for n in single], device=device)
        last = torch.tensor([(plan.groups[n].start + plan.groups[n].length - 1) // page for n in single], device=device)
        same = (breaks[req, first] == breaks[req, last]).tolist()
        start_block = blocks[req, first].tolist()
        runs = {n: blk for n, ok, blk in zip(single, same, start_block) if ok}
    return blocks, runs


def _to_fp32(p: DecodeProblem, rows: torch.Tensor, keys: torch.Tensor) -> None:
    """Convert gathered cache rows [G, h_kv, L, d or fp8 bytes] into the fp32 keys buffer [G, h_kv, L, d]."""
    if not p.is_fp8:
        keys.copy_(rows)
        return
    dv = p.head_dim_v
    nope, scales, rope = fp8_cache_views(rows, p.d, dv)
    values = keys[..., :dv].unflatten(-1, (dv // TILE, TILE))
    values.copy_(nope.unflatten(-1, (dv // TILE, TILE)))
    values.mul_(scales.unsqueeze(-1))
    keys[..., dv:].copy_(rope)
