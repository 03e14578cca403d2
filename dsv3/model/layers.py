"""Small building blocks shared by the model: RMSNorm, the hookable Linear, the SwiGLU MLP.

``Linear.impl`` is the `linear_impl` hook: a callable (x, weight) -> x @ weight.T. The default is
``F.linear``; dsv3.training.precision swaps in the FP8 kernel for every Linear whose ``fp8_exempt`` is False,
and ``MLP.swiglu_down`` under fp8.cache_swiglu_fp8.
"""
from __future__ import annotations

from typing import Callable, Optional

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
        c = (g * xhat).mean(-1, keepdim=True).mul_(rstd)
        dx = torch.addcmul(g.mul_(rstd), xhat, c, value=-1).to(x.dtype)     # rstd·(g − x̂·mean(g·x̂))
        return dx, dw, None, None


class Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul goes through a swappable ``impl`` (the linear_impl hook)."""

    def __init__(self, in_features: int, out_features: int, fp8_exempt: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_exempt = fp8_exempt  # report §3.3: embedding, head, gate, eh_proj stay BF16/FP32
        self.impl = F.linear
        # shared_impl hook: (x, [weights]) -> x · [W_1; …]ᵀ (…, ΣN) for Linears that share an input and
        # the same hook object (the FP8 one quantises x once and keeps one FP8 copy; dsv3.training.precision sets it)
        self.shared_impl: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.weight)


def packed_linear(x: torch.Tensor, *linears: Linear) -> Optional[torch.Tensor]:
    """The Linears that share input ``x`` as one GEMM on their concatenated weights, outputs side by side
    on the last dim — through their common ``shared_impl`` when they have one (FP8: one quantisation of
    x); None when some Linear has a swapped ``impl`` and no common ``shared_impl``, and on CPU outside
    autocast (measured slower there: benchmarks/README.md)."""
    hook = linears[0].shared_impl
    if hook is not None and all(lin.shared_impl is hook for lin in linears):
        return hook(x, [lin.weight for lin in linears])
    if any(lin.impl is not F.linear for lin in linears):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    if dtype is None and x.device.type == "cpu":
        return None     # without a cast to fuse into, concatenating the weights costs more than it saves on CPU
    return F.linear(x, torch.cat([lin.weight if dtype is None else lin.weight.to(dtype) for lin in linears]))


def shared_input_linears(x: torch.Tensor, *linears: Linear) -> list[torch.Tensor]:
    """``[lin(x) for lin in linears]``, as one GEMM where packed_linear can (one input cast and one GEMM
    per pass instead of one per Linear; the input gradient is summed inside the GEMM in FP32), or one
    FP8 quantisation of x for all of them (``shared_impl``)."""
    y = packed_linear(x, *linears) if len(linears) > 1 else None
    if y is None:
        return [lin(x) for lin in linears]
    return list(y.split([lin.out_features for lin in linears], dim=-1))


class _PackedSwiGLU(torch.autograd.Function):
    """h = silu(g) · u (· w per row) from gu = [g | u]; the backward writes dg and du into one packed
    gradient (no zero-filled buffer per half) with torch's fused silu_backward."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, row_weight: Optional[torch.Tensor]) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g).mul_(u)
        if row_weight is not None:
            h.mul_(row_weight.unsqueeze(-1).to(h.dtype))
        ctx.save_for_backward(gu, row_weight)
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gu, rw = ctx.saved_tensors
        g, u = gu.chunk(2, dim=-1)
        a = F.silu(g)
        drw = None
        if rw is not None:
            if ctx.needs_input_grad[1]:
                drw = (dh * a * u).sum(-1).to(rw.dtype)
            dh = dh * rw.unsqueeze(-1).to(dh.dtype)
        dgu = torch.empty_like(gu)
        dg, du = dgu.chunk(2, dim=-1)
        torch.mul(dh, a, out=du)
        torch.ops.aten.silu_backward(dh * u, g, grad_input=dg)
        return dgu, drw


def swiglu_packed(gu: torch.Tensor, row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(gate) · up (· row_weight per row) for gu = [gate | up] on the last dim."""
    return _PackedSwiGLU.apply(gu, row_weight)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)  # gate_proj
        self.w2 = Linear(inter_dim, dim)  # down_proj
        self.w3 = Linear(dim, inter_dim)  # up_proj
        self.recompute = False
        # swiglu_down hook: ([gate | up], w2) -> y, the SwiGLU and w2 as one op that caches [gate | up]
        # in FP8 and recomputes the SwiGLU output in the backward (report §3.3.3); dsv3.training.precision sets it
        self.swiglu_down: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = packed_linear(x, self.w1, self.w3)
        if self.swiglu_down is not None:        # it keeps no SwiGLU output: recompute would add nothing
            if gu is None:
                gu = torch.cat([self.w1(x), self.w3(x)], dim=-1)
            return self.swiglu_down(gu, self.w2.weight)
        fn, args = (swiglu_packed, (gu,)) if gu is not None else (swiglu, (self.w1(x), self.w3(x)))
        if self.recompute and torch.is_grad_enabled():
            # report §3.2.3: keep only SwiGLU's inputs, recompute its output in backward
            h = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        else:
            h = fn(*args)
        return self.w2(h)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
