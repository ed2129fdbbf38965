"""Overlap of one chunk's expert-parallel all-to-all with another chunk's compute (DeepSeek's F&B profile).

A chunk's forward and backward through a `MoEStage` are written as *programs*: generators that compute, start an
asynchronous EP exchange (`async_finish=True`) and yield it. Run alone (`run_to_end`), each exchange is waited for
at once; `interleave` runs a backward program and a forward program in turn, so each one's exchange is in flight
while the other computes, in the order of DeepSeek's training profile:

    combine(B) | attn(F) | mlp(B) | dispatch(F) | dispatch(B) | mlp(F) | combine(F) | attn(B) | ... post(F)

Both ways run the same operations on the same tensors, so the numerics are identical. The pieces are separate
autograd graphs joined at the exchanges by fresh leaves; `_ChunkFn` ties them to the stage's input and output so
that plain `loss.backward()` works too (its backward runs the backward program to the end).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Generator

import torch

from seekstack.pipeline.executor import run_backward


class Exchange:
    """One started EP exchange: what a program yields. `wait()` completes it (idempotent)."""

    def __init__(self, label: str, event, start: float):
        self.label, self.event, self.start = label, event, start

    def wait(self) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
            self.event = None


Program = Generator[Exchange, None, None]


class ChunkState:
    """Everything one chunk keeps from its forward for its backward."""

    out_ref = None
    grad_x: torch.Tensor | None = None
    done_backward = False


# ------------------------------------------------------------------------------------------------ EP transport
def _dispatch(m, h, w, idx, label: str) -> tuple[Exchange, tuple]:
    """Start the token dispatch; returns the exchange and (recv_x, recv_idx, recv_w, handle), valid after wait."""
    t0 = time.perf_counter()
    if m.buffer is None:  # one EP rank: every expert is local, nothing travels
        return Exchange(label, None, t0), (h.detach().clone(), idx, w.detach().clone(), None)
    buf = m.buffer
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, m.num_experts)
    recv_x, recv_idx, recv_w, _, handle, event = buf.dispatch(
        h.detach(), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w.detach(), async_finish=True,
    )  # fmt: skip
    return Exchange(label, event, t0), (recv_x, recv_idx, recv_w, handle)


def _combine(m, y, handle, label: str, weights=None) -> tuple[Exchange, tuple]:
    """Start the combine of expert rows `y` (and optional weights) back to their source tokens."""
    t0 = time.perf_counter()
    if m.buffer is None:
        return Exchange(label, None, t0), (y.detach().clone(), None if weights is None else weights.clone())
    combined, combined_w, event = m.buffer.combine(y.detach(), handle, topk_weights=weights, async_finish=True)
    return Exchange(label, event, t0), (combined, combined_w)


def _cached_dispatch(m, g, handle, label: str) -> tuple[Exchange, torch.Tensor]:
    t0 = time.perf_counter()
    if m.buffer is None:
        return Exchange(label, None, t0), g.clone()
    recv, *_rest, event = m.buffer.dispatch(g, handle=handle, async_finish=True)
    return Exchange(label, event, t0), recv


# ------------------------------------------------------------------------------------------------ programs
def forward_program(m, st: ChunkState, x: torch.Tensor, training: bool) -> Program:
    """attn(F) → dispatch(F) → mlp(F) → combine(F) → post; leaves `st.out` ([..., H]) and what backward needs."""
    shape = x.shape
    with torch.set_grad_enabled(training):
        st.x = x.detach().requires_grad_(training)
        h, w, idx = m.route(st.x.reshape(-1, shape[-1]))
    ex, (recv_x, recv_idx, recv_w, handle) = _dispatch(m, h, w, idx, "dispatch(F)")
    yield ex
    with torch.set_grad_enabled(training):
        st.recv_x, st.recv_w = recv_x.requires_grad_(training), recv_w.requires_grad_(training)
        y = m.experts_forward(st.recv_x, recv_idx, st.recv_w)
    ex, (combined, _) = _combine(m, y, handle, "combine(F)")
    yield ex
    with torch.set_grad_enabled(training):
        st.h_leaf = h.detach().requires_grad_(training)
        st.moe = combined.requires_grad_(training)
        st.out = m.post(st.h_leaf.view(shape), st.moe.view(shape))  # not a view: its storage can be freed
    if training:
        st.h, st.w, st.y, st.recv_idx, st.handle = h, w, y, recv_idx, handle


def backward_program(m, st: ChunkState, grad_out: torch.Tensor) -> Program:
    """post(B) → combine(B) → mlp(B) → dispatch(B) → attn(B); leaves the input gradient in `st.grad_x`."""
    run_backward([st.out], [grad_out])  # st.out's storage may be gone (see _ChunkFn); its graph is not
    ex, grad_y = _cached_dispatch(m, st.moe.grad, st.handle, "combine(B)")
    yield ex
    torch.autograd.backward(st.y, grad_y)
    grad_w = torch.where(st.recv_idx >= 0, st.recv_w.grad, torch.zeros((), dtype=st.recv_w.grad.dtype))
    ex, (grad_h, grad_gate) = _combine(m, st.recv_x.grad, st.handle, "dispatch(B)", weights=grad_w)
    yield ex
    torch.autograd.backward([st.h, st.w], [grad_h + st.h_leaf.grad, grad_gate])
    st.grad_x = st.x.grad
    st.done_backward = True
    for name in ("out", "moe", "y", "recv_x", "recv_w", "h", "w", "h_leaf", "x", "handle", "recv_idx"):
        setattr(st, name, None)  # the chunk's activations go as soon as its backward is done


# ------------------------------------------------------------------------------------------------ running
def _record(m, role: str, op: str, label: str, start: float, end: float, **extra) -> None:
    if m.overlap_timeline is not None:
        m.overlap_timeline.append({"op": op, "role": role, "label": label, "start": start, "end": end, **extra})


def interleave(programs: list[tuple[object, str, Program]]) -> None:
    """Run `(module, role, program)`s in turn: each runs until it starts an exchange, then the next one runs.

    A program resumes only after its exchange is waited for; meanwhile the others computed. Intervals go to each
    module's `overlap_timeline`: COMP (compute between exchanges) and COMM (start of the exchange to the end of
    its wait, with `exposed` = the time spent blocked in the wait).
    """
    pending: list[tuple[object, str, Program, Exchange | None]] = [(m, r, p, None) for m, r, p in programs]
    while pending:
        nxt = []
        for m, role, prog, ex in pending:
            if ex is not None:
                t_wait = time.perf_counter()
                ex.wait()
                t_end = time.perf_counter()
                _record(m, role, "COMM", ex.label, ex.start, t_end, exposed=t_end - t_wait)
            t0 = time.perf_counter()
            try:
                new = next(prog)
            except StopIteration:
                _record(m, role, "COMP", "end", t0, time.perf_counter())
                continue
            _record(m, role, "COMP", new.label, t0, new.start)
            nxt.append((m, role, prog, new))
        pending = nxt


def run_to_end(m, role: str, prog: Program) -> None:
    """Run one program alone: every exchange is waited for right after it starts (no overlap)."""
    interleave([(m, role, prog)])


class _ChunkFn(torch.autograd.Function):
    """Joins a chunk's pieces to autograd: input x (+ the stage's parameters) → output of the stage.

    Forward runs the forward program (or adopts a state an F&B already computed); backward runs the backward
    program unless an F&B already did, and hands back the input gradient.
    """

    @staticmethod
    def forward(ctx, x, module, state, *params):
        if state is None:
            state = ChunkState()
            run_to_end(module, "F", forward_program(module, state, x, training=True))
        ctx.state, ctx.module = state, module
        out = state.out.detach()
        # The returned tensor alone owns the bytes, so the pipeline's free-after-send releases them.
        state.out.data = torch.empty(0, dtype=out.dtype, device=out.device)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        st, m = ctx.state, ctx.module
        if not st.done_backward:
            run_to_end(m, "B", backward_program(m, st, grad_out))
        grad_x = st.grad_x if ctx.needs_input_grad[0] else None
        ctx.state = ctx.module = None
        return (grad_x, None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _params(m) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def run_chunk(m, x: torch.Tensor) -> torch.Tensor:
    """A MoE stage's forward of one chunk (no overlap); differentiable when grad mode is on."""
    if not torch.is_grad_enabled():
        st = ChunkState()
        run_to_end(m, "F", forward_program(m, st, x, training=False))
        return st.out
    out = _ChunkFn.apply(x, m, None, *_params(m))
    out.grad_fn.state.out_ref = weakref.ref(out)  # an F&B finds the output gradient of a loss chunk through it
    return out


def _find_chunk(roots) -> ChunkState | None:
    """The `_ChunkFn` node behind `roots` (an output or a loss): breadth-first over the autograd graph."""
    seen, queue = set(), [t.grad_fn for t in roots if t is not None and t.grad_fn is not None]
    while queue:
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, _ChunkFn._backward_cls):
            return node
        queue.extend(n for n, _ in node.next_functions)
    return None


def overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
    """DualPipe's F&B hook for MoE stages: chunk 0's forward overlapped with chunk 1's backward.

    Returns `(outputs0, loss0)` like the upstream hook. Chunk 1's input gradients reach its inputs through the
    autograd graph exactly as after a plain backward.
    """
    roots = [loss1] if loss1 is not None else list(outputs1)
    node = _find_chunk(roots)
    st0 = ChunkState()
    programs = [(module0, "F", forward_program(module0, st0, inputs0[0], training=True))]
    if node is not None:
        st1 = node.state
        if loss1 is not None:
            (grad_out,) = torch.autograd.grad(loss1, st1.out_ref(), retain_graph=True)
        else:
            grad_out = grads1[0]
        programs.insert(0, (module1, "B", backward_program(module1, st1, grad_out)))
    interleave(programs)
    # Chunk 1: its _ChunkFn node now hands back the gradient computed above; this only carries it to the inputs.
    if loss1 is not None:
        loss1.backward()
    elif outputs1:
        run_backward(list(outputs1), list(grads1))
    outputs0 = _ChunkFn.apply(inputs0[0], module0, st0, *_params(module0))
    st0.out_ref = weakref.ref(outputs0)
    loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
    return outputs0, loss0
