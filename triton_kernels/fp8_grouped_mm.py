"""The FP8 grouped GEMMs of the MoE experts as autograd ops, DeepSeek-V3 report §3.3: fprop, dgrad and
wgrad all in FP8 on tokens sorted by expert, through the backend's ops (``triton_kernels.backend.fp8_ops``:
the Triton kernels of ``triton_kernels/grouped_gemm.py`` or their torch references in ``gemm_ref``).

``fp8_grouped_mm`` is the model's ``grouped_mm_impl`` hook; ``fp8_gate_up`` the experts' gate and up
projections as one GEMM over [w1; w3] on one FP8 copy of x (``GroupedExperts.gate_up``). A leaf weight (the
parameter) is saved as itself and re-quantised in the backward (``fp8_linear.kept_weight``): no FP8 weight
copy per micro-batch in flight (issue 20, memory). ``high_precision``: the passes run unquantised
(triton_kernels.high_precision).
"""
from __future__ import annotations

import torch

from triton_kernels.backend import resolve_backend
from triton_kernels.fp8_linear import kept_weight
from triton_kernels.high_precision import check_passes, pass_ops
from triton_kernels.quant_ref import BLOCK, cdiv


class _FP8GroupedMM(torch.autograd.Function):
    """fprop, dgrad and wgrad of the grouped expert GEMM, all three in FP8 (report §3.3.1)."""

    @staticmethod
    def forward(ctx, x, w, offsets, backend, pow2_scale, high):
        ops = pass_ops(backend, high)
        x_fp8, x_s = ops.fprop.act_quant(x, pow2_scale=pow2_scale)
        w_fp8, w_s = ops.fprop.weight_quant(w)
        y = ops.fprop.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, out_dtype=x.dtype)
        ops.count("fp8_grouped_mm", "fprop")
        # cache the wgrad operand in FP8 already in its token-tiled, transposed layout
        x_t, x_t_s = ops.wgrad.act_quant_t(x, offsets) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(x_t, x_t_s, *kept_weight(w, w_fp8, w_s, ops), offsets)
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, x_t_s, w_fp8, w_s, offsets = ctx.saved_tensors
        ops, dx, dw = ctx.ops, None, None
        if ctx.needs_input_grad[0]:
            if w_s is None:                          # the parameter: the same quantisation again
                w_fp8, w_s = ops.dgrad.weight_quant(w_fp8)
            dy_fp8, dy_s = ops.dgrad.act_quant(dy)
            # a 128×128 block is a block either way round: wᵀ reuses w's FP8 copy and scales;
            # the copy makes the contraction dim contiguous (K-major) for the tensor cores
            w_t = w_fp8.transpose(1, 2).contiguous()
            dx = ops.dgrad.grouped_gemm(dy_fp8, dy_s, w_t, w_s.transpose(1, 2), offsets, out_dtype=ctx.x_dtype)
            ops.count("fp8_grouped_mm", "dgrad")
        if ctx.needs_input_grad[1]:
            dy_t, dy_t_s = ops.wgrad.act_quant_t(dy, offsets)
            dw = ops.wgrad.grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, offsets).to(ctx.w_dtype)
            ops.count("fp8_grouped_mm", "wgrad")
        return dx, dw, None, None, None, None


def fp8_grouped_mm(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto",
                   pow2_scale: bool = False, high_precision=()) -> torch.Tensor:
    """(M, K) tokens sorted by expert × (E, N, K) weights -> (M, N), row block g = x_g · w[g]ᵀ.

    offsets: int32 (E,) cumulative END rows (torch._grouped_mm's ``offs``); empty experts allowed.
    Autograd-aware; dgrad and wgrad in FP8 too. pow2_scale: power-of-2 activation scales (the
    report's choice for activations dispatched to the experts, §3.3.3).
    """
    if w.dim() != 3 or x_sorted.dim() != 2 or x_sorted.shape[1] != w.shape[2]:
        raise ValueError(f"fp8_grouped_mm: need x (M, K) and w (E, N, K), got {tuple(x_sorted.shape)} "
                         f"and {tuple(w.shape)}")
    if offsets.numel() != w.shape[0]:
        raise ValueError(f"fp8_grouped_mm: offsets has {offsets.numel()} entries for {w.shape[0]} experts")
    backend = resolve_backend(backend, x_sorted.device)
    return _FP8GroupedMM.apply(x_sorted, w, offsets.to(torch.int32), backend, pow2_scale,
                               check_passes(high_precision))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t (E, n, ...) zero-padded to (E, rows, ...); FP8 through its bytes (E4M3's 0x00 is +0)."""
    if t.shape[1] == rows:
        return t
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = raw.new_zeros((t.shape[0], rows) + tuple(t.shape[2:]))
    out[:, :t.shape[1]] = raw
    return out.view(t.dtype)


def stacked_weight_quant(ops, w1: torch.Tensor, w3: torch.Tensor, dtype: torch.dtype):
    """The FP8 copy and 128×128 scales of [w1; w3] cast to ``dtype``, each weight quantised on its own
    (its own ragged blocks) and zero-padded to a multiple of 128 rows, so that no block straddles the two:
    (E, 2·Np, K) and (E, 2·Np/128, ⌈K/128⌉) with Np = 128·⌈N/128⌉ (Np = N when N is a multiple of 128)."""
    n_pad = cdiv(w1.shape[1], BLOCK) * BLOCK
    parts = [ops.weight_quant(w.to(dtype)) for w in (w1, w3)]
    # as bytes: autocast's cat rejects float8 operands (an autograd.Function's forward runs under autocast)
    w_fp8 = torch.cat([_pad_rows(p[0], n_pad).view(torch.uint8) for p in parts], dim=1).view(parts[0][0].dtype)
    return w_fp8, torch.cat([p[1] for p in parts], dim=1)


class _FP8GateUp(torch.autograd.Function):
    """[gate | up] = x_g · [w1[g]; w3[g]]ᵀ per expert g: one FP8 quantisation of x (and one token-tiled
    FP8 copy for wgrad) shared by both projections, one grouped GEMM with N = 2·inter; dgrad sums both
    inside one GEMM (K = 2·inter), wgrad gives [dw1; dw3] at once. With inter not a multiple of 128 each
    half is zero-padded to one (zero weight rows: the same numbers as two separate GEMMs, plus zero columns
    that are dropped)."""

    @staticmethod
    def forward(ctx, x, w1, w3, offsets, backend, high):
        ops = pass_ops(backend, high)
        inter = w1.shape[1]
        n_pad = cdiv(inter, BLOCK) * BLOCK
        x_fp8, x_s = ops.fprop.act_quant(x)
        w_fp8, w_s = stacked_weight_quant(ops.fprop, w1, w3, x.dtype)
        gu = ops.fprop.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, out_dtype=x.dtype)
        ops.count("fp8_grouped_mm", "fprop")
        if n_pad != inter:
            gu = torch.cat([gu[:, :inter], gu[:, n_pad:n_pad + inter]], dim=1)
        wants_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        x_t, x_t_s = ops.wgrad.act_quant_t(x, offsets) if wants_dw else (None, None)
        # parameters: kept as themselves, re-quantised in backward (so too when fprop and dgrad differ in precision)
        leaf = (w1.is_leaf and w3.is_leaf) or ops.fprop is not ops.dgrad
        ctx.save_for_backward(x_t, x_t_s, offsets, *((w1, w3, None) if leaf else (None, w_fp8, w_s)))
        ctx.ops, ctx.x_dtype, ctx.w_dtypes, ctx.inter = ops, x.dtype, (w1.dtype, w3.dtype), inter
        return gu

    @staticmethod
    def backward(ctx, dgu):
        x_t, x_t_s, offsets, a, b, c = ctx.saved_tensors
        ops, dx, dw1, dw3, inter = ctx.ops, None, None, None, ctx.inter
        n_pad = cdiv(inter, BLOCK) * BLOCK
        if n_pad != inter:                         # zero gradient for the padding columns
            dgu_p = dgu.new_zeros(dgu.shape[0], 2 * n_pad)
            dgu_p[:, :inter], dgu_p[:, n_pad:n_pad + inter] = dgu[:, :inter], dgu[:, inter:]
            dgu = dgu_p
        dgu = dgu.contiguous()
        if ctx.needs_input_grad[0]:
            w_fp8, w_s = stacked_weight_quant(ops.dgrad, a, b, ctx.x_dtype) if c is None else (b, c)
            dy_fp8, dy_s = ops.dgrad.act_quant(dgu)
            dx = ops.dgrad.grouped_gemm(dy_fp8, dy_s, w_fp8.transpose(1, 2).contiguous(), w_s.transpose(1, 2),
                                        offsets, out_dtype=ctx.x_dtype)
            ops.count("fp8_grouped_mm", "dgrad")
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dy_t, dy_t_s = ops.wgrad.act_quant_t(dgu, offsets)
            dw = ops.wgrad.grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, offsets).to(ctx.x_dtype)
            ops.count("fp8_grouped_mm", "wgrad")
            # in the compute dtype first: the gradient the cast weight got before, bit for bit
            dw1, dw3 = dw[:, :inter].to(ctx.w_dtypes[0]), dw[:, n_pad:n_pad + inter].to(ctx.w_dtypes[1])
        return dx, dw1, dw3, None, None, None


def fp8_gate_up(x_sorted: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offsets: torch.Tensor,
                backend: str = "auto", high_precision=()) -> torch.Tensor:
    """(M, K) tokens sorted by expert, w1 and w3 (E, N, K) (cast to x's dtype inside) -> (M, 2N) [gate | up]."""
    if w1.shape != w3.shape or w1.dim() != 3 or x_sorted.dim() != 2 or x_sorted.shape[1] != w1.shape[2]:
        raise ValueError(f"fp8_gate_up: need x (M, K) and w1 = w3 (E, N, K), got {tuple(x_sorted.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w3.shape)}")
    if offsets.numel() != w1.shape[0]:
        raise ValueError(f"fp8_gate_up: offsets has {offsets.numel()} entries for {w1.shape[0]} experts")
    backend = resolve_backend(backend, x_sorted.device)
    return _FP8GateUp.apply(x_sorted, w1, w3, offsets.to(torch.int32), backend, check_passes(high_precision))
