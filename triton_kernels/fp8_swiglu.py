"""The routed experts' SwiGLU and down projection as one FP8 op that caches the SwiGLU input in FP8
and recomputes the SwiGLU output in the backward (DeepSeek-V3 report §3.3.3, "Low-precision storage").

    forward   h = silu(gate) · up · w_row          (gate, up: the gate/up GEMM outputs, (M, inter))
              y = h · w2[g]ᵀ per expert g          (FP8 grouped GEMM, as fp8_grouped_mm)
    saved     gate, up in E4M3 with 1×128 scales, the row weights, w2's FP8 copy — not h, not gate/up
              in the autocast dtype, not the token-tiled FP8 copy of h that wgrad reads
    backward  gate, up dequantised; h recomputed from them; dw2 = dyᵀ h, dh = dy · w2 (FP8 GEMMs);
              dgate, dup through the SwiGLU derivative at the dequantised inputs

The forward output equals the uncached path's bit for bit (same h, same quantisation of h); only the
backward sees the FP8 rounding of gate and up (relative ≤ 2^-4 per element, E4M3's 3 mantissa bits).
GroupedExperts.swiglu_down is the hook (dsv3.precision sets it under fp8.cache_swiglu_fp8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import triton_kernels
from triton_kernels.backend import fp8_ops, resolve_backend
from triton_kernels.quant_ref import act_dequant_ref


def _swiglu(gate, up, row_weight):
    """silu(gate) · (up · w_row), in the order GroupedExperts computes it (same rounding)."""
    a = F.silu(gate)
    up_w = up if row_weight is None else up * row_weight.unsqueeze(-1).to(up.dtype)
    return a, up_w, a * up_w


class _FP8SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, row_weight, w2, offsets, backend):
        ops = fp8_ops(backend)
        _, _, h = _swiglu(gate, up, row_weight)
        h_fp8, h_s = ops.act_quant(h)
        w_fp8, w_s = ops.weight_quant(w2)
        y = ops.grouped_gemm(h_fp8, h_s, w_fp8, w_s, offsets, out_dtype=h.dtype)
        triton_kernels.counters["fp8_grouped_mm.fprop"] += 1
        gate_fp8, gate_s = ops.act_quant(gate)
        up_fp8, up_s = ops.act_quant(up)
        ctx.save_for_backward(gate_fp8, gate_s, up_fp8, up_s, row_weight, w_fp8, w_s, offsets)
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, gate.dtype, w2.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_fp8, gate_s, up_fp8, up_s, row_weight, w_fp8, w_s, offsets = ctx.saved_tensors
        ops = ctx.ops
        gate = act_dequant_ref(gate_fp8, gate_s, dtype=ctx.x_dtype)
        up = act_dequant_ref(up_fp8, up_s, dtype=ctx.x_dtype)
        a, up_w, h = _swiglu(gate, up, row_weight)          # the SwiGLU output, recomputed
        dw2 = None
        if ctx.needs_input_grad[3]:
            dy_t, dy_t_s = ops.act_quant_t(dy, offsets)
            h_t, h_t_s = ops.act_quant_t(h, offsets)
            dw2 = ops.grouped_wgrad(dy_t, dy_t_s, h_t, h_t_s, offsets).to(ctx.w_dtype)
            triton_kernels.counters["fp8_grouped_mm.wgrad"] += 1
        dy_fp8, dy_s = ops.act_quant(dy)
        w_t = w_fp8.transpose(1, 2).contiguous()             # a 128×128 block is a block either way round
        dh = ops.grouped_gemm(dy_fp8, dy_s, w_t, w_s.transpose(1, 2), offsets, out_dtype=ctx.x_dtype)
        triton_kernels.counters["fp8_grouped_mm.dgrad"] += 1
        d_row_weight = None
        if row_weight is not None and ctx.needs_input_grad[2]:
            d_row_weight = (dh * a * up).sum(-1).to(row_weight.dtype)
        d_up_w = dh * a
        d_up = d_up_w if row_weight is None else d_up_w * row_weight.unsqueeze(-1).to(d_up_w.dtype)
        d_gate = torch.ops.aten.silu_backward(dh * up_w, gate)
        return d_gate, d_up, d_row_weight, dw2, None, None


def fp8_swiglu_down(gate: torch.Tensor, up: torch.Tensor, row_weight: torch.Tensor | None, w2: torch.Tensor,
                    offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """(M, inter) gate and up of rows sorted by expert, w2 (E, dim, inter) -> (M, dim): the down
    projection of silu(gate) · up · row_weight, with the SwiGLU input cached in FP8 (see module doc)."""
    if gate.shape != up.shape or gate.dim() != 2 or w2.dim() != 3 or w2.shape[2] != gate.shape[1]:
        raise ValueError(f"fp8_swiglu_down: need gate = up (M, inter) and w2 (E, dim, inter), got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(w2.shape)}")
    backend = resolve_backend(backend, gate.device)
    return _FP8SwiGLUDown.apply(gate, up, row_weight, w2, offsets.to(torch.int32), backend)
