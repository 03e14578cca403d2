"""FP8 Linear: fprop, dgrad and wgrad all as block-scaled E4M3 GEMMs, DeepSeek-V3 report §3.3 (Fig. 6).

    fprop  y  = x · Wᵀ      x: 1×128 tiles along K,      W: 128×128 blocks
    dgrad  dx = dy · W      dy: 1×128 tiles along N,     Wᵀ: the same FP8 copy and block scales
    wgrad  dW = dyᵀ · x     dyᵀ, xᵀ: 1×128 tiles along the token dim (contracting over tokens)

Master weights and their gradients stay FP32 (or the weight's dtype); the input is cached for
backward in FP8, already transposed and token-tiled for wgrad, as the report caches activations.
Block-scaled (128×128) activation gradients diverged in the report's tests, hence 1×128 for dy.
"""
from __future__ import annotations

import torch
from torch import nn

import triton_kernels
from triton_kernels.backend import fp8_ops, resolve_backend


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend):  # x (M, K), weight (N, K)
        ops = fp8_ops(backend)
        x_fp8, x_s = ops.act_quant(x)
        w_fp8, w_s = ops.weight_quant(weight)
        y = ops.gemm(x_fp8, x_s, w_fp8, w_s, out_dtype=x.dtype)
        triton_kernels.counters["fp8_linear.fprop"] += 1
        x_t, x_t_s = ops.act_quant_t(x) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(x_t, x_t_s, w_fp8, w_s)
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (M, N)
        x_t, x_t_s, w_fp8, w_s = ctx.saved_tensors
        ops, dx, dw = ctx.ops, None, None
        if ctx.needs_input_grad[0]:
            dy_fp8, dy_s = ops.act_quant(dy)
            # a 128×128 block is a block either way round: Wᵀ reuses W's FP8 copy and scales; the
            # copy makes the contraction dim contiguous (K-major), as the tensor cores read it
            dx = ops.gemm(dy_fp8, dy_s, w_fp8.t().contiguous(), w_s.t(), out_dtype=ctx.x_dtype)
            triton_kernels.counters["fp8_linear.dgrad"] += 1
        if ctx.needs_input_grad[1]:
            dy_t, dy_t_s = ops.act_quant_t(dy)
            dw = ops.gemm(dy_t, dy_t_s, x_t, x_t_s, out_dtype=torch.float32).to(ctx.w_dtype)
            triton_kernels.counters["fp8_linear.wgrad"] += 1
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ -> (..., N) in x's dtype, with FP8 fprop / dgrad / wgrad.

    backend: "auto" (triton on CUDA, else the torch fake-quant reference), "triton" or "torch".
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x (..., {weight.shape[-1]}) expected for weight {tuple(weight.shape)}, "
                         f"got x {tuple(x.shape)}")
    backend = resolve_backend(backend, x.device)
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, backend)
    return y.view(*x.shape[:-1], weight.shape[0])


class FP8Linear(nn.Module):
    """A bias-free Linear whose three GEMMs run in FP8; the FP32 master weight is the parameter."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.backend)
