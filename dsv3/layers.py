"""Small building blocks shared by the model: RMSNorm, the hookable Linear, the SwiGLU MLP.

``Linear.impl`` is the `linear_impl` hook: a callable (x, weight) -> x @ weight.T. The default is
``F.linear``; dsv3.precision swaps in the FP8 kernel for every Linear whose ``fp8_exempt`` is False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in FP32 (report §3.3: normalisations stay in high precision). With
    ``autocast_output`` (set where the output feeds exactly one Linear: the q/kv latents, the final norm)
    the output is written in the autocast dtype — what that Linear would cast it to. Outputs with several
    consumers stay in the input dtype, so their gradients are summed in FP32, not the autocast dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.autocast_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.autocast_output and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)


class _RMSNormFunction(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w in ≥ FP32, saving only x and the (…, 1) reciprocal RMS; the
    backward is dx = rstd · (g − x̂ · mean(g · x̂)), g = dy · w, dw = Σ dy · x̂ (tests/test_layers.py
    checks it against autograd of the plain formula and with gradcheck)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, w, rstd)
        return (xf * rstd).mul_(w.to(xf.dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        dyf = dy.to(rstd.dtype)
        dw = (dyf * xhat).flatten(0, -2).sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        g = dyf * w.to(rstd.dtype)
        dx = (g - xhat * (g * xhat).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return dx, dw, None, None


class Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul goes through a swappable ``impl`` (the linear_impl hook)."""

    def __init__(self, in_features: int, out_features: int, fp8_exempt: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_exempt = fp8_exempt  # report §3.3: embedding, head, gate, eh_proj stay BF16/FP32
        self.impl = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.weight)


def shared_input_linears(x: torch.Tensor, *linears: Linear) -> list[torch.Tensor]:
    """``[lin(x) for lin in linears]`` as one GEMM on the concatenated weights when every Linear uses the
    plain F.linear (one input cast and one GEMM per pass instead of one per Linear; the input gradient
    is summed inside the GEMM in FP32). With a swapped ``impl`` (FP8) each Linear runs on its own."""
    if len(linears) < 2 or any(lin.impl is not F.linear for lin in linears):
        return [lin(x) for lin in linears]
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    y = F.linear(x, torch.cat([lin.weight if dtype is None else lin.weight.to(dtype) for lin in linears]))
    return list(y.split([lin.out_features for lin in linears], dim=-1))


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)  # gate_proj
        self.w2 = Linear(inter_dim, dim)  # down_proj
        self.w3 = Linear(dim, inter_dim)  # up_proj
        self.recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_linears(x, self.w1, self.w3)
        if self.recompute and torch.is_grad_enabled():
            # report §3.2.3: keep only SwiGLU's inputs, recompute its output in backward
            h = torch.utils.checkpoint.checkpoint(swiglu, gate, up, use_reentrant=False)
        else:
            h = swiglu(gate, up)
        return self.w2(h)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
