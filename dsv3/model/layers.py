"""Small building blocks shared by the model: RMSNorm, the hookable Linear, the SwiGLU MLP.

Each module computes the plain formula unless a hook says otherwise; the hooks' defaults are the speed
paths of dsv3/model/fast/ (``fast.auto``: chosen by device and dtype, tested against the formulas here).
``Linear.impl`` is the `linear_impl` hook: a callable (x, weight) -> x @ weight.T. The default is
``F.linear``; dsv3.training.precision swaps in the FP8 kernel for every Linear whose ``fp8_exempt`` is False,
and ``MLP.swiglu_down`` under fp8.cache_swiglu_fp8.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import fast


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x · rsqrt(mean(x²) + eps) · w, computed in ≥ FP32 and written in ``out_dtype``."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)).to(out_dtype)


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
        # hook: (x, weight, eps, out_dtype) -> y; default: the formula with a memory-light backward
        self.impl: Callable = fast.auto("rms_norm", rms_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.autocast_output and torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        return self.impl(x, self.weight, self.eps, out_dtype)


class Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul goes through a swappable ``impl`` (the linear_impl hook)."""

    def __init__(self, in_features: int, out_features: int, fp8_exempt: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_exempt = fp8_exempt  # report §3.3: embedding, head, gate, eh_proj stay BF16/FP32
        self.impl = F.linear
        # shared_impl hook: (x, [weights]) -> x · [W_1; …]ᵀ (…, ΣN) for Linears that share an input and
        # the same hook object (the FP8 one quantises x once and keeps one FP8 copy; dsv3.training.precision sets it)
        self.shared_impl: Optional[Callable] = None
        # shared_input hook: (self, x) -> y for a group of Linears that read the same x, run as one GEMM
        # where that pays (fast.share_input sets it: MLA's down-projections); None = this Linear alone
        self.shared_input: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is not None:
            return self.shared_input(self, x)
        return self.impl(x, self.weight)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(x: torch.Tensor, w1: Linear, w3: Linear, recompute: bool = False) -> torch.Tensor:
    """silu(w1 x) · w3 x. With ``recompute`` (report §3.2.3) only w1 x and w3 x are kept for the
    backward, the product is recomputed there."""
    gate, up = w1(x), w3(x)
    if recompute:
        return torch.utils.checkpoint.checkpoint(silu_mul, gate, up, use_reentrant=False)
    return silu_mul(gate, up)


def gate_up(x: torch.Tensor, w1: Linear, w3: Linear) -> torch.Tensor:
    """[w1 x | w3 x] on the last dim, through the Linears' common ``shared_impl`` when they have one (FP8:
    one quantisation of x for both)."""
    hook = w1.shared_impl
    if hook is not None and w3.shared_impl is hook:
        return hook(x, [w1.weight, w3.weight])
    return torch.cat([w1(x), w3(x)], dim=-1)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)  # gate_proj
        self.w2 = Linear(inter_dim, dim)  # down_proj
        self.w3 = Linear(dim, inter_dim)  # up_proj
        self.recompute = False
        # swiglu hook: (x, w1, w3, recompute) -> silu(w1 x) · w3 x; default: w1 and w3 as one GEMM where
        # that pays, with a packed backward
        self.swiglu: Callable = fast.auto("mlp_swiglu", swiglu)
        # swiglu_down hook: ([gate | up], w2) -> y, the SwiGLU and w2 as one op that caches [gate | up]
        # in FP8 and recomputes the SwiGLU output in the backward (report §3.3.3); dsv3.training.precision sets it
        self.swiglu_down: Optional[Callable] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu_down is not None:        # it keeps no SwiGLU output: recompute would add nothing
            return self.swiglu_down(gate_up(x, self.w1, self.w3), self.w2.weight)
        return self.w2(self.swiglu(x, self.w1, self.w3, self.recompute and torch.is_grad_enabled()))
