"""Torch references for FP8 (E4M3) fine-grained quantisation, DeepSeek-V3 report §3.3.1.

No triton import here: the Hugging Face checkpoint code and the CPU training path use these.

Conventions (those of the official inference kernels):
- ``scale`` is a multiplier: scale = max(amax, 1e-4) / 448 and x ≈ x_fp8 · scale. A released
  checkpoint's ``weight_scale_inv`` is the same number.
- activations / activation gradients: one scale per 1×128 tile along the last dim (K).
- weights: one scale per 128×128 block; ragged edges are zero-padded before the amax.
- the transposed (wgrad) layout: one scale per 128×1 tile along the token dim, tiles restarting
  at every expert's first row so that none straddles two experts (DeepGEMM's contiguous layout).
- power-of-2 scales (MoE dispatch, report §3.3.3) round the exponent up, 2^ceil(log2(amax/448)),
  so |x| / scale ≤ 448 and nothing overflows E4M3 (which has no infinity: overflow gives NaN).
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # keeps all-zero tiles finite: their scale is 1e-4/448, not 0
BLOCK = 128  # the report's tile width and promotion interval N_C


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(scale)) for positive normal fp32, exactly (bit arithmetic, no log rounding)."""
    bits = scale.float().contiguous().view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, pow2_scale: bool = False) -> torch.Tensor:
    scale = amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX
    return pow2_ceil(scale) if pow2_scale else scale


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # the clamp only matters for the rare rounding of amax/448; it makes NaN impossible
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).float()


def fp8_to_float(x_fp8: torch.Tensor) -> torch.Tensor:
    """Exact E4M3 -> fp32 through a 256-entry table (2-3× faster than the CPU cast; same bits)."""
    if x_fp8.device.type != "cpu":
        return x_fp8.float()
    return torch.take(_FP8_VALUES, x_fp8.view(torch.uint8).long())


def _pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = cdiv(x.shape[-1], block) * block - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def act_quant_ref(x: torch.Tensor, block: int = BLOCK, pow2_scale: bool = False):
    """x (..., K) -> x_fp8 (..., K), scale float32 (..., ceil(K/block)): 1×128 tiles along K."""
    K = x.shape[-1]
    xp = _pad_last(x.float(), block)
    tiles = xp.unflatten(-1, (-1, block))  # (..., KB, block)
    scale = scale_from_amax(tiles.abs().amax(-1), pow2_scale)
    x_fp8 = to_fp8(tiles, scale[..., None]).flatten(-2)[..., :K]
    return x_fp8.contiguous(), scale


def act_dequant_ref(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of act_quant_ref: x_fp8 (..., K) · scale repeated over each 1×block tile."""
    K = x_fp8.shape[-1]
    tiles = _pad_last(fp8_to_float(x_fp8), block).unflatten(-1, (-1, block))
    return (tiles * scale.float()[..., None]).flatten(-2)[..., :K].to(dtype)


def weight_quant_ref(w: torch.Tensor, block: int = BLOCK):
    """w (..., N, K) -> w_fp8 (..., N, K), scale float32 (..., ceil(N/block), ceil(K/block))."""
    N, K = w.shape[-2:]
    NB, KB = cdiv(N, block), cdiv(K, block)
    wp = torch.nn.functional.pad(w.float(), (0, KB * block - K, 0, NB * block - N))
    blocks = wp.unflatten(-1, (KB, block)).unflatten(-3, (NB, block))  # (..., NB, b, KB, b)
    scale = scale_from_amax(blocks.abs().amax(dim=(-3, -1)))  # (..., NB, KB)
    w_fp8 = to_fp8(blocks, scale[..., :, None, :, None]).flatten(-4, -3).flatten(-2)
    return w_fp8[..., :N, :K].contiguous(), scale


def weight_dequant_ref(w_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_fp8 (..., N, K) · scale (..., ceil(N/block), ceil(K/block)) expanded to its blocks."""
    N, K = w_fp8.shape[-2:]
    NB, KB = scale.shape[-2:]
    wp = torch.nn.functional.pad(fp8_to_float(w_fp8), (0, KB * block - K, 0, NB * block - N))
    blocks = wp.unflatten(-1, (KB, block)).unflatten(-3, (NB, block))  # (..., NB, b, KB, b)
    w = (blocks * scale.float()[..., :, None, :, None]).flatten(-4, -3).flatten(-2)
    return w[..., :N, :K].to(dtype)


# ----------------------------------------------------------------------------------------------
# token tiles for the wgrad operands (128×1 along tokens, never straddling two experts)


def token_tiles(offsets: torch.Tensor | None, M: int, block: int = BLOCK):
    """Tile schedule over M rows grouped by ``offsets`` (int32 cumulative END rows, (E,)).

    Returns (tile_start, tile_end, tile_group, group_tile_start), int32 tensors on offsets'
    device: tile t covers rows [tile_start[t], tile_end[t]) of group tile_group[t]; group g owns
    tiles group_tile_start[g] : group_tile_start[g+1]. The tile count is the static bound
    floor((M + (block-1)·E) / block) so no host sync is needed; unused tiles are empty
    (start = end = M). With offsets None there is one group and exactly ceil(M/block) tiles.
    """
    if offsets is None:
        offsets = torch.tensor([M], dtype=torch.int32)
    device = offsets.device
    E = offsets.numel()
    # clamped to [0, M] and made non-decreasing on the device (no host sync): whatever the caller
    # passes, no kernel driven by this schedule can touch a row outside x
    ends = torch.cummax(offsets.to(torch.int64).clamp(0, M), 0).values if E else offsets.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles_per_group = (ends - starts + block - 1) // block
    group_tile_start = torch.cat([ends.new_zeros(1), tiles_per_group.cumsum(0)])  # (E+1,)
    T = (M + (block - 1) * E) // block
    t = torch.arange(T, device=device, dtype=torch.int64)
    group = torch.searchsorted(group_tile_start[1:], t, right=True)  # E for unused tiles
    valid = group < E
    g = group.clamp(max=max(E - 1, 0))
    tile_start = starts[g] + (t - group_tile_start[g]) * block
    tile_end = torch.minimum(tile_start + block, ends[g])
    tile_start = torch.where(valid, tile_start, torch.full_like(t, M))
    tile_end = torch.where(valid, tile_end, torch.full_like(t, M))
    i32 = torch.int32
    return tile_start.to(i32), tile_end.to(i32), g.to(i32), group_tile_start.to(i32)


def row_to_tile(offsets: torch.Tensor | None, M: int, block: int = BLOCK) -> torch.Tensor:
    """(M,) int64: the token tile each row falls in (same schedule as token_tiles)."""
    tile_start, tile_end, _, _ = token_tiles(offsets, M, block)
    rows = torch.arange(M, device=tile_start.device)
    # tiles are sorted by start and cover rows exactly once; empty tiles start at M
    return torch.searchsorted(tile_start.to(torch.int64), rows, right=True) - 1


def act_quant_t_ref(x: torch.Tensor, offsets: torch.Tensor | None = None, block: int = BLOCK,
                    pow2_scale: bool = False):
    """Transposing quantisation for wgrad: x (M, K) -> x_t_fp8 (K, M), scale (K, T).

    One scale per 128 tokens of one channel (a 128×1 tile of x, a 1×128 tile of xᵀ); with
    ``offsets`` the tiles restart at every group's first row (see token_tiles).
    """
    M, K = x.shape
    if offsets is None:  # one group: the tiles are plain 1×128 tiles of xᵀ (and this is faster)
        return act_quant_ref(x.t(), block, pow2_scale)
    tile = row_to_tile(offsets, M, block).to(x.device)  # (M,)
    T = token_tiles(offsets, M, block)[0].numel()
    covered = torch.arange(M, device=x.device) < token_tiles(offsets, M, block)[1].to(x.device)[tile]
    xt = torch.where(covered[:, None], x.float(), 0.0).t()  # (K, M); rows past offsets[-1]: no tile
    amax = torch.zeros(K, T, dtype=torch.float32, device=x.device)
    amax.scatter_reduce_(1, tile.expand(K, M), xt.abs(), reduce="amax", include_self=True)
    scale = scale_from_amax(amax, pow2_scale)
    x_t_fp8 = to_fp8(xt, scale.gather(1, tile.expand(K, M)))
    return x_t_fp8.contiguous(), scale


def act_dequant_t_ref(x_t_fp8: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor | None = None,
                      block: int = BLOCK) -> torch.Tensor:
    """Inverse of act_quant_t_ref: (K, M) fp32 = x_t_fp8 · scale of each row's token tile."""
    K, M = x_t_fp8.shape
    if offsets is None:
        return act_dequant_ref(x_t_fp8, scale, block)
    tile = row_to_tile(offsets, M, block).to(x_t_fp8.device)
    return fp8_to_float(x_t_fp8) * scale.gather(1, tile.expand(K, M))
