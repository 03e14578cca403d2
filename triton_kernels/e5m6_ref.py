"""Torch reference for E5M6, the 12-bit format of the cached input of the attention output projection
(DeepSeek-V3 report §3.3.3, "Low-precision storage": a customised E5M6 format, power-of-2 scales, and a
1×128 → 128×1 re-tiling in the backward). No triton import; the kernels are in ``triton_kernels.e5m6``.

Format: 1 sign bit, 5 exponent bits (bias 15), 6 mantissa bits; subnormals (step 2^-20); exponent 31
is Inf (mantissa 0) or NaN, as in IEEE half precision; round to nearest, ties to even; a finite value
beyond the largest finite one, 1.984375 · 2^15 = 65,024, saturates to it; NaN stays NaN.

Storage: E5M6 is IEEE FP16 with the 4 low mantissa bits dropped (same sign, exponent field, bias,
subnormal and Inf/NaN rules), so a code is kept in a float16 tensor whose 4 low bits are zero: the
12-bit code is ``bits >> 4`` (``e5m6_code``), and decoding is an exact widening cast. Emulated in 16
bits, as the report's kernels emulate it too (no hardware GEMM reads it).

Scales: one per 1×128 tile, a multiplier, x ≈ code_value · scale with scale = 2^ceil(log2(amax/65,024))
(amax floored at 1e-4, as for E4M3 in quant_ref; Inf/NaN elements do not enter the amax, so they encode
as Inf/NaN and the rest of the tile stays finite). The power of two is computed exactly from amax's bits:
amax = 1.f · 2^e gives 2^(e-15), or 2^(e-14) when 1.f > 1.984375. Because every scale is a power of two,
re-scaling between tilings only shifts exponents: the 128×1 re-tiled copy holds the same values
(except where a value falls below its new tile's subnormal range).
"""
from __future__ import annotations

import torch

from triton_kernels.quant_ref import AMAX_FLOOR, BLOCK, act_dequant_ref, cdiv

E5M6_MAX = 65024.0                 # 1.984375 · 2^15
E5M6_DTYPE = torch.float16         # storage: FP16 bit patterns with the 4 low bits zero
_MIN_NORMAL = 2.0 ** -14
_SUB_ROUNDER = 8.0                 # fp32 ulp at 8 is 2^-20, the E5M6 subnormal step
_MAX_MANT = 0x7E0000               # 1.984375's 23-bit fp32 mantissa field (63/64 · 2^23)


def e5m6_round(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest E5M6 value (ties to even), as fp32; saturating, Inf and NaN kept."""
    y = y.float()
    bits = y.view(torch.int32)
    mag = y.abs()
    mag_bits = bits & 0x7FFFFFFF
    # normal range: keep 6 of 23 mantissa bits, ties to even; a carry rolls into the exponent
    normal = ((mag_bits + 0xFFFF + ((mag_bits >> 17) & 1)) & -131072).view(torch.float32)
    # below 2^-14 the step is a fixed 2^-20: fp32 addition at 8 rounds to it (nearest-even)
    sub = (mag + _SUB_ROUNDER) - _SUB_ROUNDER
    r = torch.where(mag < _MIN_NORMAL, sub, normal).clamp(max=E5M6_MAX)
    r = torch.where(mag == float("inf"), mag, r)
    r = (r.view(torch.int32) | (bits & -2147483648)).view(torch.float32)     # sign, -0 included
    return torch.where(y != y, y, r)


def e5m6_code(q: torch.Tensor) -> torch.Tensor:
    """Stored E5M6 (float16) -> its 12-bit code as int32: sign << 11 | exponent << 6 | mantissa."""
    return (q.view(torch.int16).to(torch.int32) >> 4) & 0xFFF


def e5m6_from_code(code: torch.Tensor) -> torch.Tensor:
    """12-bit codes (any int dtype, 0…4095) -> stored E5M6 (float16): the code in the top 12 bits."""
    bits = (code.to(torch.int32) & 0xFFF) << 4
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(E5M6_DTYPE)


def pow2_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, 1e-4) / 65,024)), exactly, from the bits of the (normal) fp32 amax."""
    bits = amax.float().clamp(min=AMAX_FLOOR).contiguous().view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 15 + ((bits & 0x7FFFFF) > _MAX_MANT).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    return torch.where(a < float("inf"), a, 0.0)       # NaN < inf is False: NaN and Inf drop out


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    """1/scale for a power of two, exactly (254 - biased exponent)."""
    return ((254 - (scale.view(torch.int32) >> 23)) << 23).view(torch.float32)


def e5m6_quant_ref(x: torch.Tensor, block: int = BLOCK):
    """x (..., K) -> q (..., K) E5M6 in float16, scale float32 (..., ceil(K/128)): 1×128 tiles along K."""
    K = x.shape[-1]
    pad = cdiv(K, block) * block - K
    xp = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    tiles = xp.unflatten(-1, (-1, block))                               # (..., KB, block)
    scale = pow2_scale_from_amax(_finite_abs(tiles).amax(-1))
    q = e5m6_round(tiles * _inverse(scale)[..., None]).to(E5M6_DTYPE)  # exact: on the FP16 grid
    return q.flatten(-2)[..., :K].contiguous(), scale


def e5m6_dequant_ref(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of e5m6_quant_ref: q (..., K) · the scale of each 1×128 tile (fp16 -> fp32 is exact)."""
    K = q.shape[-1]
    pad = cdiv(K, block) * block - K
    qp = torch.nn.functional.pad(q.float(), (0, pad)) if pad else q.float()
    tiles = qp.unflatten(-1, (-1, block))
    return (tiles * scale.float()[..., None]).flatten(-2)[..., :K].to(dtype)


def e5m6_retile_ref(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK):
    """Backward re-tiling: q (M, K) with 1×128 scales (M, KB) -> q_t (K, M) with 128×1 scales (K, ceil(M/128)).

    Each channel's 128-token tile gets its own power-of-2 scale; the values are the same numbers
    re-scaled by a power of two (exact unless they fall below the new tile's subnormal range).
    """
    return e5m6_quant_ref(e5m6_dequant_ref(q, scale, block).t(), block)


def e5m6_wgrad_ref(dy_t_fp8: torch.Tensor, dy_t_scale: torch.Tensor, x_t: torch.Tensor,
                   x_t_scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """dW = dyᵀ · x from dy_t (N, M) E4M3 and x_t (K, M) E5M6, both in 128-token tiles -> (N, K) fp32."""
    dy_t = act_dequant_ref(dy_t_fp8, dy_t_scale, block)
    return dy_t @ e5m6_dequant_ref(x_t, x_t_scale, block).t()
