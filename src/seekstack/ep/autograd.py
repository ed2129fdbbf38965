"""Autograd for training: dispatch and combine are each other's backward (as Megatron's DeepEP glue wires them).

The gradient of dispatch (a copy of each token to several ranks) is the sum of the copies' gradients: a combine
along the same handle. The gradient of combine (a sum of copies) is a copy of the output gradient to every rank
that contributed: a cached dispatch. Top-k weights follow the same rules; weights of experts on other ranks are
constant zeros after dispatch, so their gradients are masked out.

>>> # recv_x, recv_idx, recv_w, counts, handle = dispatch_with_grad(buf, x, topk_idx, topk_weights, num_experts)
>>> # y, y_w = combine_with_grad(buf, expert(recv_x), handle)
>>> # y.sum().backward()   # x.grad and topk_weights.grad are filled through combine / dispatch
"""

from __future__ import annotations

import torch


class EPDispatch(torch.autograd.Function):
    """`forward(x, topk_weights, buffer, topk_idx, num_experts, out)` → `(recv_x, recv_topk_weights)`.

    Non-tensor results (recv top-k ids, per-expert counts, handle) are stored in the dict `out`.
    """

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx, num_experts, out):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
        )
        out.update(recv_topk_idx=recv_idx, num_recv_tokens_per_expert_list=counts, handle=handle)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_idx)
        return recv_x, recv_w

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w):
        (recv_idx,) = ctx.saved_tensors
        h = ctx.handle
        if grad_recv_x is None:
            grad_recv_x = torch.zeros(h.num_recv_tokens, 1, device=h.send_order.device)
        gw = None
        if grad_recv_w is not None:
            gw = torch.where(recv_idx >= 0, grad_recv_w, torch.zeros((), dtype=grad_recv_w.dtype))
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), h, topk_weights=gw)
        return grad_x, grad_w, None, None, None, None


class EPCombine(torch.autograd.Function):
    """`forward(x, topk_weights | None, buffer, handle)` → `(combined_x, combined_topk_weights | empty)`."""

    @staticmethod
    def forward(ctx, x, topk_weights, buffer, handle):
        combined, combined_w, _ = buffer.combine(x, handle, topk_weights=topk_weights)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.has_w = topk_weights is not None
        if combined_w is None:
            combined_w = torch.empty(0)
        return combined, combined_w

    @staticmethod
    def backward(ctx, grad_combined, grad_w):
        h = ctx.handle
        grad_x = None
        if grad_combined is not None:
            (grad_x, *_rest) = ctx.buffer.dispatch(grad_combined.contiguous(), handle=h)
        grad_tw = None
        if ctx.has_w and grad_w is not None:
            (grad_tw, *_rest) = ctx.buffer.dispatch(grad_w.contiguous(), handle=h)
        return grad_x, grad_tw, None, None


def dispatch_with_grad(buffer, x, topk_idx, topk_weights, num_experts):
    """Differentiable layout + dispatch; returns `(recv_x, recv_topk_idx, recv_topk_weights, counts, handle)`."""
    out: dict[str, object] = {}
    weights = topk_weights
    if weights is None:
        weights = torch.zeros(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
    recv_x, recv_w = EPDispatch.apply(x, weights, buffer, topk_idx, num_experts, out)
    if topk_weights is None:
        recv_w = None
    return recv_x, out["recv_topk_idx"], recv_w, out["num_recv_tokens_per_expert_list"], out["handle"]


def combine_with_grad(buffer, x, handle, topk_weights=None):
    """Differentiable combine; returns `(combined_x, combined_topk_weights | None)`."""
    combined, combined_w = EPCombine.apply(x, topk_weights, buffer, handle)
    return combined, (combined_w if topk_weights is not None else None)
