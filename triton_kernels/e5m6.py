"""E5M6 kernels for the cached input of the attention output projection (report §3.3.3): 1×128
quantise / dequantise, the backward's 1×128 → 128×1 re-tiling, and the wgrad GEMM that reads the
re-tiled E5M6 copy beside an E4M3 activation gradient.

Format, storage (FP16 bit patterns with the 4 low bits zero) and the exact power-of-2 scale are
described in ``triton_kernels.e5m6_ref``, the torch reference every kernel here matches bit for bit
(the quantisers) or up to FP32 summation order (the GEMM).
"""
from __future__ import annotations

import torch

from triton_kernels._triton_compat import require_triton, tl, triton
from triton_kernels.e5m6_ref import E5M6_DTYPE, E5M6_MAX
from triton_kernels.quant_ref import AMAX_FLOOR, BLOCK, cdiv

_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E5M6_MAX = tl.constexpr(E5M6_MAX)


@triton.jit
def _pow2_scale(amax):
    """2^ceil(log2(max(amax, 1e-4) / 65024)) from amax's bits (no division, no log: exact)."""
    bits = tl.maximum(amax, _AMAX_FLOOR).to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 15 + ((bits & 0x7FFFFF) > 0x7E0000).to(tl.int32)
    scale = (exponent << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    return scale, inverse


@triton.jit
def _finite_abs(x):
    a = tl.abs(x)
    return tl.where(a < float("inf"), a, 0.0)


@triton.jit
def _e5m6_round(y):
    """fp32 -> nearest E5M6 value in fp32 (ties to even, saturating, Inf/NaN kept): e5m6_ref.e5m6_round."""
    mag = tl.abs(y)
    mag_bits = mag.to(tl.int32, bitcast=True)
    normal = ((mag_bits + 0xFFFF + ((mag_bits >> 17) & 1)) & -131072).to(tl.float32, bitcast=True)
    sub = (mag + 8.0) - 8.0             # the fixed 2^-20 step below 2^-14
    r = tl.minimum(tl.where(mag < 0.00006103515625, sub, normal), _E5M6_MAX)
    r = tl.where(mag == float("inf"), mag, r)
    r = tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)   # the sign bit, -0 included
    return tl.where(y != y, y, r)


@triton.jit
def _e5m6_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, KB, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: BLOCK_M rows × one 1×BLOCK_K tile per row
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale, inverse = _pow2_scale(tl.max(_finite_abs(x), axis=1))
    tl.store(q_ptr + offs, _e5m6_round(x * inverse[:, None]).to(tl.float16), mask=mask)
    tl.store(s_ptr + rows * KB + pid_k, scale, mask=rows < M)


def e5m6_quant(x: torch.Tensor, block: int = BLOCK):
    """x (..., K) -> q (..., K) E5M6 (float16 storage), scale float32 (..., ceil(K/128))."""
    require_triton()
    assert block == BLOCK, "the kernels are built for the report's 128-wide tiles"
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, KB = x2.shape[0], cdiv(K, block)
    q = torch.empty(M, K, dtype=E5M6_DTYPE, device=x.device)
    s = torch.empty(M, KB, dtype=torch.float32, device=x.device)
    BLOCK_M = 32
    if M > 0 and K > 0:
        _e5m6_quant_kernel[(cdiv(M, BLOCK_M), KB)](x2, q, s, M, K, KB, BLOCK_M=BLOCK_M, BLOCK_K=block)
    return q.view(*x.shape), s.view(*x.shape[:-1], KB)


@triton.jit
def _e5m6_dequant_kernel(q_ptr, s_ptr, y_ptr, M, K, KB, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows * KB + pid_k, mask=rows < M, other=0.0)
    tl.store(y_ptr + offs, (q * s[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


def e5m6_dequant(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., K) · the scale of each 1×128 tile -> (..., K) in ``dtype``."""
    require_triton()
    assert block == BLOCK
    K = q.shape[-1]
    q2 = q.reshape(-1, K).contiguous()
    M, KB = q2.shape[0], cdiv(K, block)
    y = torch.empty(M, K, dtype=dtype, device=q.device)
    BLOCK_M = 32
    if M > 0 and K > 0:
        _e5m6_dequant_kernel[(cdiv(M, BLOCK_M), KB)](q2, scale.float().reshape(M, KB).contiguous(), y,
                                                     M, K, KB, BLOCK_M=BLOCK_M, BLOCK_K=block)
    return y.view(*q.shape)


@triton.jit
def _e5m6_retile_kernel(q_ptr, s_ptr, qt_ptr, st_ptr, M, K, KB, T, BLOCK: tl.constexpr):
    # one program: token tile t × channel tile kb, a BLOCK×BLOCK square whose rows share the
    # 1×128 scales s[rows, kb]; it leaves as BLOCK channels each with one 128×1 scale
    t, kb = tl.program_id(0), tl.program_id(1)
    rows = t * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows * KB + kb, mask=rows < M, other=0.0)
    x = q * s[:, None]                  # exact: a power-of-2 scale times a 7-bit significand
    scale, inverse = _pow2_scale(tl.max(_finite_abs(x), axis=0))      # (BLOCK,) one per channel
    qt = _e5m6_round(x * inverse[None, :]).to(tl.float16)
    tl.store(qt_ptr + cols[None, :].to(tl.int64) * M + rows[:, None], qt, mask=mask)
    tl.store(st_ptr + cols * T + t, scale, mask=cols < K)


def e5m6_retile(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK):
    """q (M, K) with 1×128 scales (M, ceil(K/128)) -> q_t (K, M) with 128×1 scales (K, ceil(M/128))."""
    require_triton()
    assert block == BLOCK
    M, K = q.shape
    KB, T = cdiv(K, block), cdiv(M, block)
    qt = torch.empty(K, M, dtype=E5M6_DTYPE, device=q.device)
    st = torch.empty(K, T, dtype=torch.float32, device=q.device)
    if M > 0 and K > 0:
        _e5m6_retile_kernel[(T, KB)](q.contiguous(), scale.float().contiguous(), qt, st, M, K, KB, T,
                                     BLOCK=block)
    return qt, st


@triton.jit
def _e5m6_wgrad_kernel(dy_ptr, x_ptr, dw_ptr, dy_s_ptr, x_s_ptr, M, N, K, T,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # dw (BLOCK_N, BLOCK_K) = Σ over 128-token tiles of dy_tile · x_tileᵀ · dy_s · x_s. Both codes
    # widen exactly to FP16 (E4M3 and E5M6 are subsets of it), so the tile product runs on FP16
    # tensor cores with FP32 accumulation, promoted with its two scales every 128 tokens
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    mask_n, mask_k = offs_n < N, offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(0, T):
        rows = t * BLOCK_T + offs_t
        row_ok = rows < M
        dy = tl.load(dy_ptr + offs_n[:, None].to(tl.int64) * M + rows[None, :],
                     mask=mask_n[:, None] & row_ok[None, :], other=0.0).to(tl.float16)
        x = tl.load(x_ptr + offs_k[None, :].to(tl.int64) * M + rows[:, None],
                    mask=row_ok[:, None] & mask_k[None, :], other=0.0)
        dy_s = tl.load(dy_s_ptr + offs_n * T + t, mask=mask_n, other=0.0)
        x_s = tl.load(x_s_ptr + offs_k * T + t, mask=mask_k, other=0.0)
        acc += tl.dot(dy, x) * dy_s[:, None] * x_s[None, :]
    tl.store(dw_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], acc,
             mask=mask_n[:, None] & mask_k[None, :])


def e5m6_wgrad(dy_t_fp8: torch.Tensor, dy_t_scale: torch.Tensor, x_t: torch.Tensor,
               x_t_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """dW = dyᵀ x: dy_t (N, M) E4M3 with (N, T) scales, x_t (K, M) E5M6 with (K, T) scales -> (N, K) fp32."""
    require_triton()
    assert block == BLOCK
    N, M = dy_t_fp8.shape
    K = x_t.shape[0]
    T = cdiv(M, block)
    assert dy_t_scale.shape == (N, T) and x_t_scale.shape == (K, T), "both operands need 128-token tiles"
    dw = torch.zeros(N, K, dtype=torch.float32, device=dy_t_fp8.device)
    if N == 0 or K == 0 or M == 0:
        return dw
    BLOCK_N, BLOCK_K = 128, 128
    _e5m6_wgrad_kernel[(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))](
        dy_t_fp8.contiguous(), x_t.contiguous(), dw, dy_t_scale.float().contiguous(),
        x_t_scale.float().contiguous(), M, N, K, T,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_T=block, num_warps=8, num_stages=3)
    return dw
