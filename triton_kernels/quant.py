"""FP8 (E4M3) fine-grained quantisation kernels, DeepSeek-V3 report §3.3.1 (Fig. 7a).

Each kernel is a ``@triton.jit`` body plus a small launcher; the torch references with the same
signatures and conventions are in ``triton_kernels.quant_ref`` (scale = max(amax,1e-4)/448 is a
multiplier, x ≈ x_fp8 · scale).
"""
from __future__ import annotations

import torch

from triton_kernels._triton_compat import require_triton, tl, triton
from triton_kernels.quant_ref import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX, cdiv, token_tiles

# jit code may read module globals only when they are constexpr
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _scale_from_amax(amax, POW2: tl.constexpr):
    scale = tl.math.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)   # IEEE division: '/' is approximate on sm_90
    if POW2:
        # exact ceil to a power of two on the bits: a log2 could round an exact power down
        bits = scale.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = (exponent << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _round_to_e4m3(y):
    """Round |y| ≤ 448 to the E4M3 grid (nearest-even) in fp32, so the final cast is exact.

    Why: the CPU interpreter's fp32→fp8 cast drops the mantissa carry (124 becomes 64); pre-rounding
    makes interpreter and GPU agree bit-for-bit with torch's ``.to(float8_e4m3fn)``.
    """
    bits = y.to(tl.int32, bitcast=True)
    # keep 3 of 23 mantissa bits, ties to even; a carry rolls into the exponent by itself
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # below 2^-6 E4M3 is subnormal with a fixed step of 2^-9: fp32 add/sub at 2^14 rounds to it
    mag = tl.abs(y)
    sub = (mag + 16384.0) - 16384.0
    sub = tl.where(y < 0, -sub, sub)
    return tl.where(mag < 0.015625, sub, normal)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K, KB,
                      POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: BLOCK_M rows × one 1×BLOCK_K tile per row (one scale per row)
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.abs(x), axis=1), POW2)
    y = tl.clamp(tl.math.div_rn(x, scale[:, None]), -_FP8_MAX, _FP8_MAX)
    tl.store(y_ptr + offs, _round_to_e4m3(y).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * KB + pid_k, scale, mask=rows < M)


def act_quant(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """x (..., K) -> x_fp8 (..., K), scale float32 (..., ceil(K/128)): 1×128 tiles along K."""
    require_triton()
    assert block == BLOCK, "the kernels are built for the report's 128-wide tiles"
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, KB = x2.shape[0], cdiv(K, block)
    y = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(M, KB, dtype=torch.float32, device=x.device)
    BLOCK_M = 32
    if M > 0 and K > 0:
        _act_quant_kernel[(cdiv(M, BLOCK_M), KB)](x2, y, s, M, K, KB, POW2=pow2_scale,
                                                  BLOCK_M=BLOCK_M, BLOCK_K=block)
    return y.view(*x.shape), s.view(*x.shape[:-1], KB)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, NB, KB, BLOCK: tl.constexpr):
    # one program: one BLOCK×BLOCK block of one (expert's) weight; edges masked = zero-padded
    pid_en, pid_k = tl.program_id(0), tl.program_id(1)
    e, pid_n = pid_en // NB, pid_en % NB
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = e.to(tl.int64) * N * K + rows[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.max(tl.abs(w), axis=1), axis=0), False)
    y = tl.clamp(tl.math.div_rn(w, scale), -_FP8_MAX, _FP8_MAX)
    tl.store(y_ptr + offs, _round_to_e4m3(y).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_en * KB + pid_k, scale)


def weight_quant(w: torch.Tensor, block: int = BLOCK):
    """w (..., N, K) -> w_fp8 (..., N, K), scale float32 (..., ceil(N/128), ceil(K/128))."""
    require_triton()
    assert block == BLOCK
    N, K = w.shape[-2:]
    w3 = w.reshape(-1, N, K).contiguous()
    E, NB, KB = w3.shape[0], cdiv(N, block), cdiv(K, block)
    y = torch.empty(E, N, K, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(E, NB, KB, dtype=torch.float32, device=w.device)
    if w3.numel() > 0:
        _weight_quant_kernel[(E * NB, KB)](w3, y, s, N, K, NB, KB, BLOCK=block)
    return y.view(*w.shape), s.view(*w.shape[:-2], NB, KB)


@triton.jit
def _weight_dequant_kernel(x_ptr, s_ptr, y_ptr, N, K, NB, KB, BLOCK: tl.constexpr):
    pid_en, pid_k = tl.program_id(0), tl.program_id(1)
    e, pid_n = pid_en // NB, pid_en % NB
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offs = e.to(tl.int64) * N * K + rows[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + pid_en * KB + pid_k)
    tl.store(y_ptr + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


def weight_dequant(w_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_fp8 (..., N, K) · its 128×128 block scales -> (..., N, K) in ``dtype``."""
    require_triton()
    assert block == BLOCK
    N, K = w_fp8.shape[-2:]
    x3 = w_fp8.reshape(-1, N, K).contiguous()
    E, NB, KB = x3.shape[0], cdiv(N, block), cdiv(K, block)
    y = torch.empty(E, N, K, dtype=dtype, device=w_fp8.device)
    if x3.numel() > 0:
        _weight_dequant_kernel[(E * NB, KB)](x3, scale.float().contiguous(), y, N, K, NB, KB, BLOCK=block)
    return y.view(*w_fp8.shape)


@triton.jit
def _act_quant_t_kernel(x_ptr, y_ptr, s_ptr, tile_start_ptr, tile_end_ptr, M, K, T,
                        POW2: tl.constexpr, BLOCK: tl.constexpr):
    # one program: token tile t (≤128 rows of one expert) × BLOCK channels; each channel's
    # 128 tokens share a scale, and the tile is written transposed so wgrad reads K-major rows
    t, pid_k = tl.program_id(0), tl.program_id(1)
    start = tl.load(tile_start_ptr + t)
    end = tl.load(tile_end_ptr + t)
    rows = start + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < end)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(tl.abs(x), axis=0), POW2)  # (BLOCK,) one per channel
    y = tl.clamp(tl.math.div_rn(x, scale[None, :]), -_FP8_MAX, _FP8_MAX)
    y_offs = cols[None, :].to(tl.int64) * M + rows[:, None]
    tl.store(y_ptr + y_offs, _round_to_e4m3(y).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + cols * T + t, scale, mask=cols < K)


def act_quant_t(x: torch.Tensor, offsets: torch.Tensor | None = None, block: int = BLOCK,
                pow2_scale: bool = False):
    """x (M, K) -> x_t_fp8 (K, M), scale (K, T): 128×1 token tiles (per expert with ``offsets``)."""
    require_triton()
    assert block == BLOCK
    M, K = x.shape
    if offsets is not None:
        offsets = offsets.to(x.device)
    tile_start, tile_end, _, _ = token_tiles(offsets, M, block)
    tile_start, tile_end = tile_start.to(x.device), tile_end.to(x.device)
    T = tile_start.numel()
    # zeros: rows past offsets[-1] belong to no tile and are never written
    y = torch.zeros(K, M, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(K, T, dtype=torch.float32, device=x.device)
    if T > 0 and K > 0:
        _act_quant_t_kernel[(T, cdiv(K, block))](x.contiguous(), y, s, tile_start, tile_end, M, K, T,
                                                 POW2=pow2_scale, BLOCK=block)
    return y, s
