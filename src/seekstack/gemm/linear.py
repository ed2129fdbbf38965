"""`FP8Linear`: a linear layer whose three GEMMs run in FP8 with fine-grained scales (DeepSeek-V3's recipe).

- forward `y = x @ W.T`: x quantised per token (1x128), W per 128x128 block;
- dgrad `dx = dy @ W`: dy per token, W's block quantisation transposed (128x128 blocks transpose exactly);
- wgrad `dW = dy.T @ x`: both quantised 1x128 along the token axis (`wgrad_gemm_fp8_fp8_fp32_nt`, fp32).

Only FP8 copies of the activations are kept for backward. Two storage modes:

- training (default): `weight` is a high-precision master Parameter; its FP8 copy is re-made when it changes.
- `fp8_weight=True`: `weight` is stored as FP8 with `weight_scale_inv` (the dequantisation factors of each 128x128
  block), the key names of DeepSeek-V3 checkpoints, so their state dicts load directly. The weight is frozen;
  gradients still flow to the input.

>>> layer = FP8Linear(256, 128, bias=True, dtype=torch.float32)
>>> x = torch.randn(4, 7, 256, requires_grad=True)
>>> y = layer(x)
>>> y.shape
torch.Size([4, 7, 128])
>>> y.sum().backward()
>>> x.grad.shape, layer.weight.grad.shape
(torch.Size([4, 7, 256]), torch.Size([128, 256]))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .casting import FP8_DTYPE, per_block_cast_to_fp8, per_channel_cast_to_fp8, per_token_cast_to_fp8
from .dense import fp8_gemm_nt, wgrad_gemm_fp8_fp8_fp32_nt
from .layout import ceil_div
from .reference import dequantize

_OUT_DTYPES = (torch.bfloat16, torch.float32)


def _gemm_out(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    dtype = x.dtype if x.dtype in _OUT_DTYPES else torch.float32
    return torch.empty((rows, cols), dtype=dtype, device=x.device)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, w_fp8, w_sf, backend):
        xq, sx = per_token_cast_to_fp8(x2d)
        y = _gemm_out(x2d, x2d.shape[0], w_fp8.shape[0])
        fp8_gemm_nt((xq, sx), (w_fp8, w_sf), y, backend=backend)
        need_wgrad = weight is not None and ctx.needs_input_grad[1]
        # wgrad needs x quantised along tokens; quantise now and keep only that FP8 copy.
        xt = per_channel_cast_to_fp8(x2d) if need_wgrad else (None, None)
        ctx.save_for_backward(w_fp8, w_sf, *xt) if need_wgrad else ctx.save_for_backward(w_fp8, w_sf)
        ctx.need_wgrad, ctx.backend, ctx.x_dtype = need_wgrad, backend, x2d.dtype
        return y.to(x2d.dtype)

    @staticmethod
    def backward(ctx, dy):
        w_fp8, w_sf, *xt = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyq, sdy = per_token_cast_to_fp8(dy)
            dx = _gemm_out(dy, dy.shape[0], w_fp8.shape[1])
            fp8_gemm_nt((dyq, sdy), (w_fp8.T, w_sf.T), dx, backend=ctx.backend)
            dx = dx.to(ctx.x_dtype)
        if ctx.need_wgrad:
            xq, sx = xt
            dyq, sdy = per_channel_cast_to_fp8(dy)
            dw = torch.zeros((w_fp8.shape[0], w_fp8.shape[1]), dtype=torch.float32, device=dy.device)
            wgrad_gemm_fp8_fp8_fp32_nt((dyq.T, sdy.T), (xq.T, sx.T), dw, backend=ctx.backend)
        return dx, dw, None, None, None


class FP8Linear(nn.Module):
    """`y = x @ W.T + b` with FP8 forward, dgrad and wgrad GEMMs (see the module docstring).

    `dtype` is the master weight's and bias's dtype (activations may be bf16 or fp32; outputs follow `x`).
    `backend` picks the GEMM implementation ("cpu", "reference", "triton"; default by device).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device=None,
        dtype: torch.dtype = torch.bfloat16,
        fp8_weight: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features/out_features: must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.fp8_weight, self.backend = fp8_weight, backend
        master = torch.empty(out_features, in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(master, a=math.sqrt(5))
        if fp8_weight:
            w_fp8, w_sf = per_block_cast_to_fp8(master)
            self.weight = nn.Parameter(w_fp8, requires_grad=False)
            self.weight_scale_inv = nn.Parameter(w_sf, requires_grad=False)
        else:
            self.weight = nn.Parameter(master.to(dtype))
            self.register_parameter("weight_scale_inv", None)
        if bias:
            bound = 1 / math.sqrt(in_features)
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._cache: tuple[int, int, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fp8_weight: bool = False, backend: str | None = None) -> FP8Linear:
        """An FP8Linear with `linear`'s weight (quantised per 128x128 block when `fp8_weight`) and bias."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            fp8_weight=fp8_weight,
            backend=backend,
        )
        with torch.no_grad():
            if fp8_weight:
                w_fp8, w_sf = per_block_cast_to_fp8(linear.weight)
                layer.weight.copy_(w_fp8)
                layer.weight_scale_inv.copy_(w_sf)
            else:
                layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(fp8 [out, in], scales [ceil(out/128), ceil(in/128)])`, cached until the master weight changes."""
        if self.fp8_weight:
            return self.weight, self.weight_scale_inv
        key = (self.weight._version, self.weight.data_ptr())
        if self._cache is None or self._cache[:2] != key:
            with torch.no_grad():
                self._cache = (*key, *per_block_cast_to_fp8(self.weight))
        return self._cache[2], self._cache[3]

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the GEMMs actually use, in fp32."""
        return dequantize(*self.quantized_weight(), 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        if x.dtype == FP8_DTYPE or not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point activation (bf16/fp32), got {x.dtype}")
        w_fp8, w_sf = self.quantized_weight()
        master = None if self.fp8_weight else self.weight
        y = _FP8LinearFunction.apply(x.reshape(-1, self.in_features), master, w_fp8, w_sf, self.backend)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fp8_weight={self.fp8_weight}, scale_blocks={ceil_div(self.out_features, 128)}x"
            f"{ceil_div(self.in_features, 128)}"
        )
