"""The routed experts' SwiGLU and down projection as one FP8 op that caches the SwiGLU input in FP8
and recomputes the SwiGLU output in the backward (DeepSeek-V3 report §3.3.3, "Low-precision storage").

    forward   h = silu(gate) · up · w_row          ([gate | up]: the gate/up GEMM's output, (M, 2·inter))
              y = h · w2[g]ᵀ per expert g          (FP8 grouped GEMM, as fp8_grouped_mm)
    saved     gate and up in E4M3 with 1×128 scales (one tensor), the row weights, and w2 itself (the
              parameter, re-quantised in the backward; a non-leaf w2: its FP8 copy) — not h, not gate/up
              in the autocast dtype, not the token-tiled FP8 copy of h that wgrad reads
    backward  gate, up dequantised; h recomputed from them; dw2 = dyᵀ h, dh = dy · w2 (FP8 GEMMs);
              dgate, dup through the SwiGLU derivative at the dequantised inputs; the row weight's
              gradient ⟨dh, silu(gate)·up⟩ (the routing weight multiplies h before the down-projection,
              so no expert output row is kept for it)

The forward output equals the uncached path's bit for bit (same h, same quantisation of h); only the
backward sees the FP8 rounding of gate and up (relative ≤ 2^-4 per element, E4M3's 3 mantissa bits).
gate and up keep their own 1×128 tiles (one quantisation of [gate | up] when inter is a multiple of 128).
GroupedExperts.swiglu_down is the hook (dsv3.training.precision sets it under fp8.cache_swiglu_fp8); the dense FFN
and the shared experts (dsv3.model.layers.MLP.swiglu_down) get the same through ``fp8_swiglu_linear``: one
group, fp8_linear's GEMMs (issue 20, memory). ``high_precision``: the down projection's passes run
unquantised (triton_kernels.high_precision); [gate | up] stays cached in FP8 (storage, not a GEMM pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from triton_kernels.backend import resolve_backend
from triton_kernels.fp8_linear import dgrad, kept_weight, wgrad
from triton_kernels.high_precision import check_passes, pass_ops
from triton_kernels.quant_ref import BLOCK, act_dequant_ref


def _swiglu(gate, up, row_weight):
    """silu(gate) · (up · w_row), in the order GroupedExperts computes it (same rounding)."""
    a = F.silu(gate)
    up_w = up if row_weight is None else up * row_weight.unsqueeze(-1).to(up.dtype)
    return a, up_w, a * up_w


def _quant_halves(ops, gu):
    """gate and up (the halves of gu) in E4M3 with their own 1×128 tiles, as one (M, 2·inter) FP8 tensor and
    (M, 2·⌈inter/128⌉) scales: one quantisation of gu when inter is a multiple of 128 (the tiles coincide)."""
    inter = gu.shape[1] // 2
    if inter % BLOCK == 0:
        return ops.act_quant(gu)
    parts = [ops.act_quant(h.contiguous()) for h in (gu[:, :inter], gu[:, inter:])]
    q = torch.cat([p[0].view(torch.uint8) for p in parts], dim=1).view(parts[0][0].dtype)  # autocast: no float8 cat
    return q, torch.cat([p[1] for p in parts], dim=1)


def _swiglu_backward(dh, gate, up, a, up_w, row_weight, row_weight_grad: bool):
    """[dgate | dup] and the row weight's gradient ⟨dh, silu(gate)·up⟩ from dh, at the given gate and up."""
    d_row_weight = None
    if row_weight is not None and row_weight_grad:
        d_row_weight = (dh * a * up).sum(-1).to(row_weight.dtype)
    d_up_w = dh * a
    d_up = d_up_w if row_weight is None else d_up_w * row_weight.unsqueeze(-1).to(d_up_w.dtype)
    d_gate = torch.ops.aten.silu_backward(dh * up_w, gate)
    return torch.cat([d_gate, d_up], dim=1), d_row_weight


def _dequant_halves(gu_fp8, gu_s, dtype):
    inter, nb = gu_fp8.shape[1] // 2, gu_s.shape[1] // 2
    return (act_dequant_ref(gu_fp8[:, :inter], gu_s[:, :nb], dtype=dtype),
            act_dequant_ref(gu_fp8[:, inter:], gu_s[:, nb:], dtype=dtype))


class _FP8SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu, row_weight, w2, offsets, backend, high):
        ops = pass_ops(backend, high)
        inter = gu.shape[1] // 2
        _, _, h = _swiglu(gu[:, :inter], gu[:, inter:], row_weight)
        h_fp8, h_s = ops.fprop.act_quant(h)
        w_fp8, w_s = ops.fprop.weight_quant(w2.to(gu.dtype))  # in the compute dtype, as every expert GEMM
        y = ops.fprop.grouped_gemm(h_fp8, h_s, w_fp8, w_s, offsets, out_dtype=h.dtype)
        ops.count("fp8_grouped_mm", "fprop")
        gu_fp8, gu_s = _quant_halves(ops.fp8, gu)
        ctx.save_for_backward(gu_fp8, gu_s, row_weight, offsets, *kept_weight(w2, w_fp8, w_s, ops))
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, gu.dtype, w2.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        gu_fp8, gu_s, row_weight, offsets, w_fp8, w_s = ctx.saved_tensors
        ops = ctx.ops
        if w_s is None:                                       # the parameter: the same quantisation again
            w_fp8, w_s = ops.dgrad.weight_quant(w_fp8.to(ctx.x_dtype))
        gate, up = _dequant_halves(gu_fp8, gu_s, ctx.x_dtype)
        a, up_w, h = _swiglu(gate, up, row_weight)          # the SwiGLU output, recomputed
        dw2 = None
        if ctx.needs_input_grad[2]:
            dy_t, dy_t_s = ops.wgrad.act_quant_t(dy, offsets)
            h_t, h_t_s = ops.wgrad.act_quant_t(h, offsets)
            # in the compute dtype first: the gradient the cast weight got before, bit for bit
            dw2 = ops.wgrad.grouped_wgrad(dy_t, dy_t_s, h_t, h_t_s, offsets).to(ctx.x_dtype).to(ctx.w_dtype)
            ops.count("fp8_grouped_mm", "wgrad")
        dy_fp8, dy_s = ops.dgrad.act_quant(dy)
        w_t = w_fp8.transpose(1, 2).contiguous()             # a 128×128 block is a block either way round
        dh = ops.dgrad.grouped_gemm(dy_fp8, dy_s, w_t, w_s.transpose(1, 2), offsets, out_dtype=ctx.x_dtype)
        ops.count("fp8_grouped_mm", "dgrad")
        dgu, d_row_weight = _swiglu_backward(dh, gate, up, a, up_w, row_weight, ctx.needs_input_grad[1])
        return dgu, d_row_weight, dw2, None, None, None


def fp8_swiglu_down(gu: torch.Tensor, row_weight: torch.Tensor | None, w2: torch.Tensor,
                    offsets: torch.Tensor, backend: str = "auto", high_precision=()) -> torch.Tensor:
    """(M, 2·inter) [gate | up] of rows sorted by expert, w2 (E, dim, inter) (cast to gu's dtype inside)
    -> (M, dim): the down projection of silu(gate) · up · row_weight, with [gate | up] cached in FP8."""
    if gu.dim() != 2 or w2.dim() != 3 or gu.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"fp8_swiglu_down: need [gate | up] (M, 2·inter) and w2 (E, dim, inter), got "
                         f"{tuple(gu.shape)}, {tuple(w2.shape)}")
    backend = resolve_backend(backend, gu.device)
    return _FP8SwiGLUDown.apply(gu, row_weight, w2, offsets.to(torch.int32), backend, check_passes(high_precision))


class _FP8SwiGLULinear(torch.autograd.Function):
    """The dense FFN's (and shared experts') SwiGLU and w2 as one op: the forward is fp8_linear's on
    h = silu(gate) · up (same quantisation, same GEMM: the same output bit for bit); the backward is
    fp8_linear's dgrad / wgrad on h recomputed from the E4M3 [gate | up]."""

    @staticmethod
    def forward(ctx, gu, w2, backend, high):                 # gu (M, 2·inter), w2 (dim, inter)
        ops = pass_ops(backend, high)
        inter = gu.shape[1] // 2
        _, _, h = _swiglu(gu[:, :inter], gu[:, inter:], None)
        h_fp8, h_s = ops.fprop.act_quant(h)
        w_fp8, w_s = ops.fprop.weight_quant(w2)
        y = ops.fprop.gemm(h_fp8, h_s, w_fp8, w_s, out_dtype=h.dtype)
        ops.count("fp8_linear", "fprop")
        gu_fp8, gu_s = _quant_halves(ops.fp8, gu)
        ctx.save_for_backward(gu_fp8, gu_s, *kept_weight(w2, w_fp8, w_s, ops))
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, gu.dtype, w2.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        gu_fp8, gu_s, w_fp8, w_s = ctx.saved_tensors
        ops = ctx.ops
        gate, up = _dequant_halves(gu_fp8, gu_s, ctx.x_dtype)
        a, up_w, h = _swiglu(gate, up, None)                 # the SwiGLU output, recomputed
        dw2 = None
        if ctx.needs_input_grad[1]:
            dw2 = wgrad(ops, dy, *ops.wgrad.act_quant_t(h), ctx.w_dtype)
        dh = dgrad(ops, dy, w_fp8, w_s, ctx.x_dtype)
        return _swiglu_backward(dh, gate, up, a, up_w, None, False)[0], dw2, None, None


def fp8_swiglu_linear(gu: torch.Tensor, w2: torch.Tensor, backend: str = "auto", high_precision=()) -> torch.Tensor:
    """(..., 2·inter) [gate | up], w2 (dim, inter) -> (..., dim): fp8_linear(silu(gate) · up, w2) with
    [gate | up] cached in FP8 and the SwiGLU output recomputed in the backward (the MLP's swiglu_down)."""
    if w2.dim() != 2 or gu.shape[-1] != 2 * w2.shape[1]:
        raise ValueError(f"fp8_swiglu_linear: need [gate | up] (..., 2·inter) and w2 (dim, inter), got "
                         f"{tuple(gu.shape)}, {tuple(w2.shape)}")
    backend = resolve_backend(backend, gu.device)
    y = _FP8SwiGLULinear.apply(gu.reshape(-1, gu.shape[-1]), w2, backend, check_passes(high_precision))
    return y.view(*gu.shape[:-1], w2.shape[0])
