"""Small stage modules for tests, the demo, the timeline and the benchmark.

`MLPStage` is upstream's example stage (Linear(h, 4h) -> GELU -> Linear(4h, h), no bias) built on a linear whose
weight gradient cooperates with `WeightGradStore` (deferred to a W step when zero-bubble is on).
`SleepStage` stands in for a stage of known F, B and W cost without using the CPU, so bubbles can be measured
cleanly on a 2-core machine running 4-8 ranks.

>>> stage = MLPStage(8)
>>> stage(torch.randn(3, 5, 8)).shape
torch.Size([3, 5, 8])
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from seekstack.pipeline.executor import run_backward
from seekstack.pipeline.weight_grad_store import WeightGradStore


@torch.no_grad()
def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.clone() if grad._is_view() else grad  # a view would forbid later in-place adds
    else:
        param.grad += grad


class _DeferrableLinear(torch.autograd.Function):
    """y = x W^T; backward returns dx now and computes dW now or, under zero-bubble, in a later W step."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors

        def weight_grad():
            _accumulate(weight, grad_out.flatten(0, -2).t() @ x.flatten(0, -2))

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad_out @ weight, None


class DeferrableLinear(nn.Linear):
    """nn.Linear without bias whose weight gradient can be deferred by `WeightGradStore`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return _DeferrableLinear.apply(x, self.weight)


class MLPStage(nn.Module):
    """Upstream's example stage. `deferrable=False` uses plain nn.Linear (no zero-bubble W split)."""

    def __init__(self, hidden: int, deferrable: bool = True):
        super().__init__()
        lin = DeferrableLinear if deferrable else (lambda i, o: nn.Linear(i, o, bias=False))
        self.linear1 = lin(hidden, 4 * hidden)
        self.linear2 = lin(4 * hidden, hidden)

    def forward(self, x):
        return self.linear2(F.gelu(self.linear1(x)))


class OverlappedMLPStage(MLPStage):
    """MLPStage with the `overlapped_forward_backward` hook; it runs the two chunks one after the other."""

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, grads1):
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        elif outputs1:
            run_backward(list(outputs1), list(grads1))  # outputs1 may have been freed after their send
        return outputs0, loss0


class _SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, f, b, w):
        time.sleep(f)
        ctx.save_for_backward(x, scale)
        ctx.times = (b, w)
        return x * scale

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        b, w = ctx.times
        time.sleep(b - w)

        def weight_grad():
            time.sleep(w)
            _accumulate(scale, (grad_out * x).sum().reshape(scale.shape))

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad_out * scale, None, None, None, None


class SleepStage(nn.Module):
    """A stage costing `f` seconds forward, `b` seconds full backward of which `w` is the weight gradient."""

    def __init__(self, f: float, b: float, w: float):
        super().__init__()
        if not 0 <= w <= b:
            raise ValueError(f"w: must be within [0, b={b}], got {w}")
        self.scale = nn.Parameter(torch.ones(1))
        self.times = (f, b, w)

    def forward(self, x):
        return _SleepFn.apply(x, self.scale, *self.times)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The examples' criterion; `.clone()` so the executor's in-place `detach_` never touches a view."""
    return F.mse_loss(output, target).clone()
