"""Block-scaled FP8 GEMM with FP32 promotion every N_C = 128, DeepSeek-V3 report §3.3.2 (Fig. 7b).

out = a · bᵀ. Each 128-long K block is one tensor-core dot of FP8 tiles into a fresh FP32 partial
sum, which is then multiplied by a_scale[m, k] · b_scale[n, k] and added to the FP32 accumulator
(the "promotion to CUDA cores" of the report; Triton keeps both in registers). Because the block
width equals the quantisation tile, every partial product has exactly one pair of scales.
The torch reference is ``triton_kernels.gemm_ref.fp8_gemm_ref``.
"""
from __future__ import annotations

import torch

from triton_kernels._triton_compat import require_triton, tl, triton
from triton_kernels.gemm_ref import b_scale_is_per_row
from triton_kernels.quant_ref import BLOCK, cdiv


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_ask, stride_bsn, stride_bsk,
                     B_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    # activation-gradient scales are per row; weight scales per 128×128 block, and a BLOCK_N ≤ 128
    # tile lies in one block: one scalar per K block, not BLOCK_N equal loads (40-65 registers and,
    # on sm_100a, 128 loads per thread per K block — benchmarks/README.md, "Kernel report")
    tl.static_assert(B_PER_ROW or BLOCK_K % BLOCK_N == 0)
    b_s_rows = offs_n if B_PER_ROW else pid_n * BLOCK_N // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K  # ragged last block: zeros add nothing
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(a_s_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
        if B_PER_ROW:
            b_s = tl.load(b_s_ptr + b_s_rows * stride_bsn + kb * stride_bsk, mask=mask_n, other=0.0)[None, :]
        else:
            b_s = tl.load(b_s_ptr + b_s_rows * stride_bsn + kb * stride_bsk)
        # one N_C = 128 interval: FP8 dot into FP32, scaled, then promoted into the accumulator
        acc += tl.dot(a, b) * a_s[:, None] * b_s
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm_blocks(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): narrow M tiles for decode-like M, as DeepGEMM picks 64 there."""
    return (64, 128, 4) if M <= 64 else (128, 128, 8)


def fp8_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block: int = BLOCK) -> torch.Tensor:
    """a_fp8 (M, K), a_scale (M, ceil(K/128)); b_fp8 (N, K), b_scale (ceil(N/128) or N, ceil(K/128)).

    Returns a · bᵀ (M, N) in out_dtype. Operands may be strided views (dgrad passes wᵀ as a view).
    """
    require_triton()
    assert block == BLOCK, "the promotion interval and the quantisation tile are both 128"
    M, K = a_fp8.shape
    N, Kb = b_fp8.shape
    assert K == Kb, f"K mismatch: a has {K}, b has {Kb}"
    assert a_scale.shape == (M, cdiv(K, block)), f"a_scale {tuple(a_scale.shape)} != {(M, cdiv(K, block))}"
    per_row = b_scale_is_per_row(b_fp8, b_scale, block)
    out = torch.empty(M, N, dtype=out_dtype, device=a_fp8.device)
    if M == 0 or N == 0:
        return out
    a_scale, b_scale = a_scale.float(), b_scale.float()
    BLOCK_M, BLOCK_N, num_warps = gemm_blocks(M)
    grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
    _fp8_gemm_kernel[grid](a_fp8, b_fp8, out, a_scale, b_scale, M, N, K,
                           a_fp8.stride(0), a_fp8.stride(1), b_fp8.stride(0), b_fp8.stride(1),
                           out.stride(0), out.stride(1), a_scale.stride(0), a_scale.stride(1),
                           b_scale.stride(0), b_scale.stride(1), B_PER_ROW=per_row,
                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block,
                           num_warps=num_warps, num_stages=3)
    return out
