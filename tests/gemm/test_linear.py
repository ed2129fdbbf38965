"""FP8Linear: FP8 forward, dgrad and wgrad against fp32 autograd of the same (pre-quantisation) weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seekstack.gemm import FP8Linear, calc_diff, per_block_cast_to_fp8
from seekstack.gemm.reference import dequantize
from seekstack.gemm.testing import fp8_tolerance


def _fp32_autograd(layer, x, dy):
    w = layer.weight.detach().float().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().float().clone().requires_grad_()
    xr = x.detach().float().clone().requires_grad_()
    F.linear(xr, w, b).backward(dy.float())
    return F.linear(xr, w, b), xr.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,k,n", [((300,), 384, 256), ((2, 7), 1000, 130)])
def test_forward_dgrad_wgrad_match_fp32_autograd(seed, dtype, shape, k, n):
    layer = FP8Linear(k, n, bias=True, dtype=dtype)
    x = torch.randn(*shape, k, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape, n) and y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, dbr = _fp32_autograd(layer, x, dy)
    # Each GEMM quantises both operands to e4m3 with 128-wide scales: DeepGEMM's gate applies to all three.
    tol = fp8_tolerance(x.numel() // k)
    assert calc_diff(y, yr) < tol
    assert x.grad.dtype == dtype and calc_diff(x.grad, dxr) < tol
    assert layer.weight.grad.dtype == dtype and calc_diff(layer.weight.grad, dwr) < tol
    assert calc_diff(layer.bias.grad, dbr) < 1e-5


def test_fp8_weight_mode_loads_deepseek_v3_state_dict(seed):
    w = torch.randn(200, 300)
    w_fp8, w_sf = per_block_cast_to_fp8(w)
    layer = FP8Linear(300, 200, fp8_weight=True)
    layer.load_state_dict({"weight": w_fp8, "weight_scale_inv": w_sf})
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    x = torch.randn(5, 300, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert calc_diff(y, x.float() @ w.T) < fp8_tolerance(5)
    y.float().sum().backward()
    # dy is all ones (exact in FP8), so dx is the column sum of the dequantised weight up to bf16 rounding.
    assert calc_diff(x.grad, dequantize(w_fp8, w_sf, 128).sum(0).expand(5, -1)) < 1e-5


def test_from_linear_and_training_updates_the_fp8_copy(seed):
    ref = torch.nn.Linear(256, 64)
    layer = FP8Linear.from_linear(ref)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    x, target = torch.randn(128, 256), torch.randn(128, 64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    before = layer.quantized_weight()[0].view(torch.uint8).clone()
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.quantized_weight()[0].view(torch.uint8), before)
    fp8 = FP8Linear.from_linear(ref, fp8_weight=True)
    assert calc_diff(fp8.dequantized_weight(), ref.weight) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need its interpreter")
def test_triton_backend_under_the_interpreter(seed):
    pytest.importorskip("triton")
    layer = FP8Linear(256, 128, dtype=torch.float32, backend="triton")
    x = torch.randn(64, 256, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _fp32_autograd(layer, x, dy)
    assert calc_diff(y, yr) < 1e-3 and calc_diff(x.grad, dxr) < 1e-3 and calc_diff(layer.weight.grad, dwr) < 1e-3


def test_bad_input():
    layer = FP8Linear(128, 64)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 100))
    with pytest.raises(ValueError, match="x"):
        layer(torch.zeros(3, 128, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_features"):
        FP8Linear(0, 4)


@pytest.mark.gpu
def test_cuda_training_step(seed):
    layer = FP8Linear(7168, 2112, bias=True, device="cuda")
    x = torch.randn(4, 1000, 7168, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr, dxr, dwr, _ = _fp32_autograd(layer, x, dy)
    assert calc_diff(y, yr) < 1e-3 and calc_diff(x.grad, dxr) < 1e-3 and calc_diff(layer.weight.grad, dwr) < 1e-3
