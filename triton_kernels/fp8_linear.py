"""FP8 Linear: fprop, dgrad and wgrad all as block-scaled E4M3 GEMMs, DeepSeek-V3 report §3.3 (Fig. 6).

    fprop  y  = x · Wᵀ      x: 1×128 tiles along K,      W: 128×128 blocks
    dgrad  dx = dy · W      dy: 1×128 tiles along N,     Wᵀ: the same FP8 copy and block scales
    wgrad  dW = dyᵀ · x     dyᵀ, xᵀ: 1×128 tiles along the token dim (contracting over tokens)

Master weights and their gradients stay FP32 (or the weight's dtype); the input is cached for
backward in FP8, already transposed and token-tiled for wgrad, as the report caches activations.
The weight's FP8 copy is not kept for backward when the weight is a leaf (the parameter): dgrad
re-quantises it, so micro-batches in flight hold no FP8 weight copies (issue 20, memory).
Block-scaled (128×128) activation gradients diverged in the report's tests, hence 1×128 for dy.

``input_cache="e5m6"`` (the attention output projection ``wo``, report §3.3.3): the input is cached
in E5M6 with 1×128 power-of-2 scales (triton_kernels.e5m6_ref); the backward re-tiles it to 128×1
token tiles and wgrad reads that E5M6 copy beside the E4M3 dy (the E4M3 × E5M6 GEMM in e5m6.py).

``high_precision``: the passes (of "fprop", "dgrad", "wgrad") run without quantisation
(triton_kernels.high_precision); a high-precision wgrad keeps the input as it is, not an FP8/E5M6 copy.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from triton_kernels.backend import resolve_backend
from triton_kernels.high_precision import check_passes, pass_ops

INPUT_CACHES = ("fp8", "e5m6")


def e5m6_ops(backend: str) -> SimpleNamespace:
    """quant / retile / wgrad of E5M6 for one resolved backend (same signatures)."""
    if backend == "triton":
        from triton_kernels import e5m6
        return SimpleNamespace(quant=e5m6.e5m6_quant, retile=e5m6.e5m6_retile, wgrad=e5m6.e5m6_wgrad)
    from triton_kernels import e5m6_ref
    return SimpleNamespace(quant=e5m6_ref.e5m6_quant_ref, retile=e5m6_ref.e5m6_retile_ref,
                           wgrad=e5m6_ref.e5m6_wgrad_ref)


def kept_weight(weight, w_fp8, w_s, ops=None) -> tuple:
    """What a backward keeps of a weight: a leaf (the parameter) as itself, re-quantised by ``dgrad`` —
    no FP8 copy per micro-batch in flight, bit-identical (the same quantisation of the same weight); a
    non-leaf weight its FP8 copy and scales, unless fprop and dgrad differ in precision (``ops``, pass_ops):
    then the weight itself, for dgrad's own ops."""
    reuse = ops is None or ops.fprop is ops.dgrad
    return (w_fp8, w_s) if reuse and not weight.is_leaf else (weight, None)


def dgrad(ops, dy, w_fp8, w_s, x_dtype):
    """dx = dy · W in FP8 (1×128 dy tiles, W's 128×128 blocks) through ``ops`` (pass_ops); ``w_s`` None:
    ``w_fp8`` is the weight itself (``kept_weight``), quantised here."""
    ops, count = ops.dgrad, ops.count
    if w_s is None:
        w_fp8, w_s = ops.weight_quant(w_fp8)
    dy_fp8, dy_s = ops.act_quant(dy)
    # a 128×128 block is a block either way round: Wᵀ reuses W's FP8 copy and scales; the copy makes the
    # contraction dim contiguous (K-major), as the tensor cores read it
    dx = ops.gemm(dy_fp8, dy_s, w_fp8.t().contiguous(), w_s.t(), out_dtype=x_dtype)
    count("fp8_linear", "dgrad")
    return dx


def wgrad(ops, dy, x_t, x_t_s, w_dtype):
    """dW = dyᵀ · x in FP8 from the token-tiled copies of dy and x (``ops.wgrad.act_quant_t``), accumulated
    in FP32."""
    ops, count = ops.wgrad, ops.count
    dy_t, dy_t_s = ops.act_quant_t(dy)
    dw = ops.gemm(dy_t, dy_t_s, x_t, x_t_s, out_dtype=torch.float32).to(w_dtype)
    count("fp8_linear", "wgrad")
    return dw


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, backend, input_cache, high):  # x (M, K), weight (N, K)
        ops = pass_ops(backend, high)
        x_fp8, x_s = ops.fprop.act_quant(x)
        w_fp8, w_s = ops.fprop.weight_quant(weight)
        y = ops.fprop.gemm(x_fp8, x_s, w_fp8, w_s, out_dtype=x.dtype)
        ops.count("fp8_linear", "fprop")
        ctx.e5m6 = e5m6_ops(backend) if input_cache == "e5m6" and "wgrad" not in ops.high else None
        if not ctx.needs_input_grad[1]:
            x_t, x_t_s = None, None
        elif ctx.e5m6 is not None:
            x_t, x_t_s = ctx.e5m6.quant(x)      # (M, K) with 1×128 tiles: re-tiled in backward
        else:
            x_t, x_t_s = ops.wgrad.act_quant_t(x)
        ctx.save_for_backward(x_t, x_t_s, *kept_weight(weight, w_fp8, w_s, ops))
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, x.dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # dy (M, N)
        x_t, x_t_s, w_fp8, w_s = ctx.saved_tensors
        ops, dx, dw = ctx.ops, None, None
        if ctx.needs_input_grad[0]:
            dx = dgrad(ops, dy, w_fp8, w_s, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if ctx.e5m6 is not None:
                dy_t, dy_t_s = ops.wgrad.act_quant_t(dy)
                dw = ctx.e5m6.wgrad(dy_t, dy_t_s, *ctx.e5m6.retile(x_t, x_t_s)).to(ctx.w_dtype)
                ops.count("fp8_linear", "wgrad")
            else:
                dw = wgrad(ops, dy, x_t, x_t_s, ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto",
               input_cache: str = "fp8", high_precision=()) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ -> (..., N) in x's dtype, with FP8 fprop / dgrad / wgrad.

    backend: "auto" (triton on CUDA, else the torch fake-quant reference), "triton" or "torch".
    input_cache: "fp8" (E4M3, token-tiled) or "e5m6" (the report's format for wo's input).
    high_precision: passes (of "fprop", "dgrad", "wgrad") run unquantised in x's dtype.
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x (..., {weight.shape[-1]}) expected for weight {tuple(weight.shape)}, "
                         f"got x {tuple(x.shape)}")
    if input_cache not in INPUT_CACHES:
        raise ValueError(f"fp8_linear: input_cache must be one of {INPUT_CACHES}, got {input_cache!r}")
    backend = resolve_backend(backend, x.device)
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight, backend, input_cache, check_passes(high_precision))
    return y.view(*x.shape[:-1], weight.shape[0])


class _FP8SharedLinear(torch.autograd.Function):
    """x · [W_1; …; W_n]ᵀ for Linears that share x (MLA's wq_a / wkv_a, an MLP's w1 / w3): x quantised
    once for the fprop and its token-tiled FP8 copy kept once for every wgrad (issue 20, memory); each
    GEMM as fp8_linear's (same numbers: outputs bit for bit, dx the sum of the n dgrads in x's dtype, as
    autograd adds them for separate Linears)."""

    @staticmethod
    def forward(ctx, x, backend, high, *weights):             # x (M, K), weights (N_i, K)
        ops = pass_ops(backend, high)
        x_fp8, x_s = ops.fprop.act_quant(x)
        ys, kept = [], []
        for w in weights:
            w_fp8, w_s = ops.fprop.weight_quant(w)
            ys.append(ops.fprop.gemm(x_fp8, x_s, w_fp8, w_s, out_dtype=x.dtype))
            ops.count("fp8_linear", "fprop")
            kept += kept_weight(w, w_fp8, w_s, ops)
        x_t, x_t_s = ops.wgrad.act_quant_t(x) if any(ctx.needs_input_grad[3:]) else (None, None)
        ctx.save_for_backward(x_t, x_t_s, *kept)
        ctx.ops, ctx.x_dtype, ctx.w_dtypes = ops, x.dtype, [w.dtype for w in weights]
        ctx.widths = [w.shape[0] for w in weights]
        return torch.cat(ys, dim=1)

    @staticmethod
    def backward(ctx, dy):                                    # dy (M, ΣN_i)
        x_t, x_t_s, *kept = ctx.saved_tensors
        ops, dx, dws = ctx.ops, None, []
        for i, dy_i in enumerate(dy.split(ctx.widths, dim=1)):
            dy_i = dy_i.contiguous()
            if ctx.needs_input_grad[0]:
                dx_i = dgrad(ops, dy_i, kept[2 * i], kept[2 * i + 1], ctx.x_dtype)
                dx = dx_i if dx is None else dx + dx_i
            dws.append(wgrad(ops, dy_i, x_t, x_t_s, ctx.w_dtypes[i]) if ctx.needs_input_grad[3 + i] else None)
        return (dx, None, None, *dws)


def fp8_linear_shared(x: torch.Tensor, weights: list[torch.Tensor], backend: str = "auto",
                      high_precision=()) -> torch.Tensor:
    """x (..., K) @ [W_1; …; W_n]ᵀ -> (..., ΣN_i), the outputs side by side: fp8_linear on each weight,
    with x quantised once and one FP8 copy of it kept for the backward (the ``Linear.shared_impl`` hook)."""
    if any(w.dim() != 2 or w.shape[1] != x.shape[-1] for w in weights):
        raise ValueError(f"fp8_linear_shared: x (..., K) and weights (N_i, K) expected, got x {tuple(x.shape)}, "
                         f"weights {[tuple(w.shape) for w in weights]}")
    backend = resolve_backend(backend, x.device)
    y = _FP8SharedLinear.apply(x.reshape(-1, x.shape[-1]), backend, check_passes(high_precision), *weights)
    return y.view(*x.shape[:-1], y.shape[-1])


class FP8Linear(nn.Module):
    """A bias-free Linear whose three GEMMs run in FP8; the FP32 master weight is the parameter."""

    def __init__(self, in_features: int, out_features: int, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.backend)
