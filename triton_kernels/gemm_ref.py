"""Torch references for block-scaled FP8 GEMMs (dense and grouped), DeepSeek-V3 report §3.3.2.

No triton import. Each reference dequantises its operands (exact: fp8 · fp32 scale is exact in
fp32 unless the scale is extreme) and multiplies in FP32, which is what the kernels compute with
promotion: per 128-long K block, an FP32 partial product scaled by a_scale · b_scale, summed in FP32.
On CPU these are also the "fake-quant" training path.

Operand layouts ("NT", as DeepGEMM and the official kernel.py):
- a (M, K) fp8 with a_scale (M, ceil(K/128)): 1×128 tiles along K.
- b (N, K) fp8 with either b_scale (ceil(N/128), ceil(K/128)) (a weight, 128×128 blocks) or
  b_scale (N, ceil(K/128)) (an activation-gradient, 1×128 tiles; used by wgrad).
- out = a · bᵀ, (M, N).
"""
from __future__ import annotations

import torch

from triton_kernels.quant_ref import (BLOCK, act_dequant_ref, act_dequant_t_ref, cdiv,
                                      weight_dequant_ref)


def b_scale_is_per_row(b_fp8: torch.Tensor, b_scale: torch.Tensor, block: int = BLOCK) -> bool:
    """True for 1×128 row tiles (N, KB), False for 128×128 blocks (NB, KB); equal when N ≤ 1."""
    N = b_fp8.shape[-2]
    return b_scale.shape[-2] == N and N != cdiv(N, block)


def dequant_b_ref(b_fp8: torch.Tensor, b_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    if b_scale_is_per_row(b_fp8, b_scale, block):
        return act_dequant_ref(b_fp8, b_scale, block)
    return weight_dequant_ref(b_fp8, b_scale, block)


def fp8_gemm_ref(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """(M, K) × (N, K)ᵀ -> (M, N) in out_dtype, FP32 accumulation."""
    a = act_dequant_ref(a_fp8, a_scale, block)
    b = dequant_b_ref(b_fp8, b_scale, block)
    return (a @ b.t()).to(out_dtype)


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(e) for e in offsets.tolist()]
    return list(zip([0] + ends[:-1], ends))


def fp8_grouped_gemm_ref(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor,
                         b_scale: torch.Tensor, offsets: torch.Tensor,
                         out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """Rows of expert g (offsets: int32 cumulative END rows) times b[g]ᵀ: (M, K) × (E, N, K) -> (M, N).

    Used for the MoE forward (b = w, (E, N, K)) and dgrad (b = wᵀ, (E, K, N) with its scales
    transposed: a 128×128 block is a block either way round, report §3.3.2).
    """
    a = act_dequant_ref(a_fp8, a_scale, block)
    return grouped_rows_mm(a, weight_dequant_ref(b_fp8, b_scale, block), offsets).to(out_dtype)


def grouped_rows_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of group g times b[g]ᵀ, (M, K) × (E, N, K) -> (M, N) in a's dtype (b of the same dtype)."""
    out = a.new_zeros(a.shape[0], b.shape[1])
    for g, (s, e) in enumerate(_group_bounds(offsets)):
        if e > s:
            out[s:e] = a[s:e] @ b[g].t()
    return out


def fp8_grouped_wgrad_ref(dy_t_fp8: torch.Tensor, dy_t_scale: torch.Tensor, x_t_fp8: torch.Tensor,
                          x_t_scale: torch.Tensor, offsets: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """dW[g] = dy_gᵀ · x_g, contracting each expert's own tokens: (N, M), (K, M) -> (E, N, K) fp32.

    Both operands come from act_quant_t(…, offsets): 128-token tiles that restart at every expert.
    """
    dy_t = act_dequant_t_ref(dy_t_fp8, dy_t_scale, offsets, block)
    return grouped_tokens_mm(dy_t, act_dequant_t_ref(x_t_fp8, x_t_scale, offsets, block), offsets)


def grouped_tokens_mm(dy_t: torch.Tensor, x_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[g] = dy_gᵀ · x_g over each group's own tokens (columns): (N, M), (K, M) -> (E, N, K), each product in
    the operands' dtype, stored in FP32."""
    bounds = _group_bounds(offsets)
    dw = torch.zeros(len(bounds), dy_t.shape[0], x_t.shape[0], dtype=torch.float32, device=dy_t.device)
    for g, (s, e) in enumerate(bounds):
        if e > s:
            dw[g] = dy_t[:, s:e] @ x_t[:, s:e].t()
    return dw
