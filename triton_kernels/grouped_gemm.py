"""FP8 grouped GEMMs for MoE experts on tokens sorted by expert, DeepSeek-V3 report §3.3 with
DeepGEMM's contiguous layout: M is tiled in 128-token tiles that never straddle two experts.

Groups come from ``offsets`` (int32 cumulative END rows, torch._grouped_mm's ``offs``), any size,
0 included. Instead of padding each expert's rows to a multiple of 128 (DeepGEMM), a tile
schedule (``quant_ref.token_tiles``) lists per tile its rows and expert and the ragged tail is
masked; its length is a static bound, so nothing syncs with the host.

- fprop  y[rows_g]  = x_g · w[g]ᵀ           (x 1×128 tiles, w 128×128 blocks)
- dgrad  dx[rows_g] = dy_g · w[g]            (same kernel, b = wᵀ as a strided view)
- wgrad  dw[g]      = dy_gᵀ · x_g            (both 128×1 token tiles per expert, contracting tokens)
Torch references: ``gemm_ref.fp8_grouped_gemm_ref`` / ``fp8_grouped_wgrad_ref``. The autograd ops over
them (``fp8_grouped_mm``, ``fp8_gate_up``) are in ``triton_kernels/fp8_grouped_mm.py``, as ``fp8_linear.py``
is over ``fp8_gemm.py``.
"""
from __future__ import annotations

import torch

from triton_kernels._triton_compat import require_triton, tl, triton
from triton_kernels.quant_ref import BLOCK, cdiv, token_tiles


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, tile_start_ptr, tile_end_ptr, tile_group_ptr,
                         N, K, stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                         stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk, stride_cm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: one token tile (rows of a single expert g) × BLOCK_N output columns
    t, pid_n = tl.program_id(0), tl.program_id(1)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    g = tl.load(tile_group_ptr + t).to(tl.int64)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < end, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + g * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    # w[g]'s scales are per 128×128 block and the BLOCK_N ≤ 128 tile lies in one: one scalar per K block
    tl.static_assert(BLOCK_K % BLOCK_N == 0)
    b_s_ptr += g * stride_bse + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the static tile bound leaves up to E spare (empty) tiles: they skip the K loop entirely
    num_kb = tl.where(end > start, tl.cdiv(K, BLOCK_K), 0)
    for kb in range(0, num_kb):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        a_s = tl.load(a_s_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptr + kb * stride_bsk)
        acc += tl.dot(a, b) * a_s[:, None] * b_s  # promotion every N_C = 128
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_grouped_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                     block: int = BLOCK) -> torch.Tensor:
    """a (M, K) 1×128-scaled, b (E, N, K) with (E, ceil(N/128), ceil(K/128)) scales -> (M, N)."""
    require_triton()
    assert block == BLOCK
    M, K = a_fp8.shape
    E, N, Kb = b_fp8.shape
    assert K == Kb and offsets.numel() == E, \
        f"shapes: a {tuple(a_fp8.shape)}, b {tuple(b_fp8.shape)}, {offsets.numel()} offsets"
    # zeros: rows past offsets[-1] belong to no expert and no tile writes them
    out = torch.zeros(M, N, dtype=out_dtype, device=a_fp8.device)
    tile_start, tile_end, tile_group, _ = (t.to(a_fp8.device) for t in token_tiles(offsets, M, block))
    T = tile_start.numel()
    if T == 0 or N == 0:
        return out
    a_scale, b_scale = a_scale.float(), b_scale.float()
    BLOCK_N = 128
    _grouped_gemm_kernel[(T, cdiv(N, BLOCK_N))](
        a_fp8, b_fp8, out, a_scale, b_scale, tile_start, tile_end, tile_group, N, K,
        a_fp8.stride(0), a_fp8.stride(1), b_fp8.stride(0), b_fp8.stride(1), b_fp8.stride(2),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        out.stride(0), BLOCK_M=block, BLOCK_N=BLOCK_N, BLOCK_K=block, num_warps=8, num_stages=3)
    return out


@triton.jit
def _grouped_wgrad_kernel(dy_ptr, x_ptr, dw_ptr, dy_s_ptr, x_s_ptr, tile_start_ptr, tile_end_ptr,
                          group_tile_ptr, M, N, K, T,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # one program: expert g × (BLOCK_N, BLOCK_K) of dw[g]; the reduction runs over g's token tiles,
    # each a 128-long promotion interval with one scale per (channel, tile) on either side
    g, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    mask_n, mask_k = offs_n < N, offs_k < K
    t0 = tl.load(group_tile_ptr + g)
    t1 = tl.load(group_tile_ptr + g + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(t0, t1):
        start = tl.load(tile_start_ptr + t)
        end = tl.load(tile_end_ptr + t)
        rows = start + offs_t
        row_ok = rows < end
        dy = tl.load(dy_ptr + offs_n[:, None].to(tl.int64) * M + rows[None, :],
                     mask=mask_n[:, None] & row_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_T)
        x = tl.load(x_ptr + offs_k[None, :].to(tl.int64) * M + rows[:, None],
                    mask=row_ok[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        dy_s = tl.load(dy_s_ptr + offs_n * T + t, mask=mask_n, other=0.0)
        x_s = tl.load(x_s_ptr + offs_k * T + t, mask=mask_k, other=0.0)
        acc += tl.dot(dy, x) * dy_s[:, None] * x_s[None, :]
    dw_ptrs = dw_ptr + g.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(dw_ptrs, acc, mask=mask_n[:, None] & mask_k[None, :])


def fp8_grouped_wgrad(dy_t_fp8: torch.Tensor, dy_t_scale: torch.Tensor, x_t_fp8: torch.Tensor,
                      x_t_scale: torch.Tensor, offsets: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """dw[g] = dy_gᵀ x_g from act_quant_t outputs: (N, M), (N, T), (K, M), (K, T) -> (E, N, K) fp32."""
    require_triton()
    assert block == BLOCK
    N, M = dy_t_fp8.shape
    K = x_t_fp8.shape[0]
    E = offsets.numel()
    dw = torch.empty(E, N, K, dtype=torch.float32, device=dy_t_fp8.device)
    tile_start, tile_end, _, group_tile = (t.to(dy_t_fp8.device) for t in token_tiles(offsets, M, block))
    T = tile_start.numel()
    assert dy_t_scale.shape == (N, T) and x_t_scale.shape == (K, T), \
        "wgrad scales must come from act_quant_t(…, offsets) with the same offsets"
    if dw.numel() == 0:
        return dw
    BLOCK_N, BLOCK_K = 128, 128
    _grouped_wgrad_kernel[(E, cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))](
        dy_t_fp8.contiguous(), x_t_fp8.contiguous(), dw, dy_t_scale.float().contiguous(),
        x_t_scale.float().contiguous(), tile_start, tile_end, group_tile, M, N, K, T,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_T=block, num_warps=8, num_stages=3)
    return dw
