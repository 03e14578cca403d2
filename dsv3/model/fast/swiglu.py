"""SwiGLU on a packed [gate | up], fast: the implementations behind ``MLP.swiglu`` (dsv3.model.layers) and
``GroupedExperts.swiglu`` (dsv3.model.experts). Gate and up come out of one GEMM (the MLP's w1, w3 through
``packed_linear``; the experts' [w1; w3] as one grouped GEMM), and ``_PackedSwiGLU`` writes dgate and dup
into one packed gradient with torch's fused silu_backward, keeping only [gate | up] for the backward.
Each returns None where it does not apply, and the model's plain formula runs instead:
``layers.swiglu`` (silu(w1 x) · w3 x) and ``experts.experts_swiglu``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.fast.grouped_mm import grouped_mm_auto, grouped_mm_segments
from dsv3.model.fast.shared_input import packed_linear


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


def _run(fn, *args, recompute: bool) -> torch.Tensor:
    if recompute:       # report §3.2.3: keep only the SwiGLU's input, recompute its output in backward
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def mlp_swiglu(x: torch.Tensor, w1: nn.Module, w3: nn.Module, recompute: bool = False) -> Optional[torch.Tensor]:
    """silu(w1 x) · w3 x with w1 and w3 as one GEMM (``packed_linear``); None where that does not pack."""
    gu = packed_linear(x, w1, w3)
    return None if gu is None else _run(swiglu_packed, gu, recompute=recompute)


def experts_swiglu(x: torch.Tensor, offsets: torch.Tensor, row_weight: Optional[torch.Tensor], experts: nn.Module,
                   recompute: bool = False) -> Optional[torch.Tensor]:
    """silu(gate) · up · row_weight with gate and up as one grouped GEMM on [w1; w3] (one pass over x; dx
    summed inside the GEMM); None unless the experts' ``gmm`` is the segment / auto one and no FP8
    ``gate_up`` hook is set. Not for FP32 on CPU (``default_impls``), where concatenating the FP32 weights
    every step costs more than it saves (benchmarks/bench_moe.py: 1.13× with it, 1.2× without)."""
    if experts.gate_up is not None or experts.gmm not in (grouped_mm_auto, grouped_mm_segments):
        return None
    gu = experts.gmm(x, torch.cat([experts.w1.to(x.dtype), experts.w3.to(x.dtype)], dim=1), offsets)
    return _run(swiglu_packed, gu, row_weight, recompute=recompute)
