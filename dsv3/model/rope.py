"""Rotary position embedding on adjacent pairs (x[2i], x[2i+1]) — the official DeepSeek-V3 layout
(complex multiplication; transformers' ``rope_interleave``) — with YaRN context extension.

YaRN (Peng et al. 2023) as transformers applies it whenever ``rope_scaling`` is set: frequencies
blended between interpolation (/factor) and extrapolation by a linear ramp over the correction
range [beta_fast, beta_slow]; cos/sin × mscale(factor, mscale)/mscale(factor, mscale_all_dim); and
the softmax scale × mscale(factor, mscale_all_dim)² (see ``softmax_scale``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dsv3.model.args import MLAConfig, RopeScaling


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(dim: int, base: float, scaling: Optional[RopeScaling]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) in fp64 and the cos/sin attention factor."""
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if scaling is None:
        return freqs, 1.0
    low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, scaling.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, scaling.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # 1 = keep the original frequency (high-frequency dims)
    freqs = freqs / scaling.factor * (1 - extrapolate) + freqs * extrapolate
    if scaling.mscale and scaling.mscale_all_dim:
        attn_factor = yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    else:
        attn_factor = yarn_mscale(scaling.factor)
    return freqs, attn_factor


def rope_cos_sin(cfg: MLAConfig, max_seq_len: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, qk_rope_head_dim/2)."""
    freqs, attn_factor = inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    # fp32 frequencies as transformers computes them, so positions agree with the HF reference
    freqs = freqs.float().double()
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    cos, sin = angles.cos() * attn_factor, angles.sin() * attn_factor
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)


def softmax_scale(cfg: MLAConfig) -> float:
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling.mscale_all_dim:
        m = yarn_mscale(cfg.rope_scaling.factor, cfg.rope_scaling.mscale_all_dim)
        scale *= m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: (x[2i] + i·x[2i+1]) · e^{iθ}, as DeepSeek's ``apply_rotary_emb``. x: (B, T, H, d);
    cos, sin: (T, d/2). Computed in the tables' dtype and returned in x's. The reference of the
    ``MLA.rotate`` hook (dsv3/model/fast/rope.py: the same forward with a lighter backward)."""
    rot = torch.complex(cos, sin)[:, None, :]                                     # e^{iθ}: (T, 1, d/2)
    pairs = torch.view_as_complex(x.to(cos.dtype).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)
