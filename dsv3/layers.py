"""Small building blocks shared by the model: RMSNorm, the hookable Linear, the SwiGLU MLP.

``Linear.impl`` is the `linear_impl` hook: a callable (x, weight) -> x @ weight.T. The default is
``F.linear``; dsv3.precision swaps in the FP8 kernel for every Linear whose ``fp8_exempt`` is False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in FP32 (report §3.3: normalisations stay in high precision)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.bfloat16, torch.float16) else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.to(x.dtype)).to(dtype)


class Linear(nn.Linear):
    """nn.Linear (no bias) whose matmul goes through a swappable ``impl`` (the linear_impl hook)."""

    def __init__(self, in_features: int, out_features: int, fp8_exempt: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_exempt = fp8_exempt  # report §3.3: embedding, head, gate, eh_proj stay BF16/FP32
        self.impl = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.weight)


class MLP(nn.Module):
    """SwiGLU FFN: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim)  # gate_proj
        self.w2 = Linear(inter_dim, dim)  # down_proj
        self.w3 = Linear(dim, inter_dim)  # up_proj
        self.recompute = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        if self.recompute and torch.is_grad_enabled():
            # report §3.2.3: keep only SwiGLU's inputs, recompute its output in backward
            h = torch.utils.checkpoint.checkpoint(swiglu, gate, up, use_reentrant=False)
        else:
            h = swiglu(gate, up)
        return self.w2(h)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
