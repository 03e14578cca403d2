"""FP8 grouped GEMMs for MoE experts on tokens sorted by expert, DeepSeek-V3 report §3.3 with
DeepGEMM's contiguous layout: M is tiled in 128-token tiles that never straddle two experts.

Groups come from ``offsets`` (int32 cumulative END rows, torch._grouped_mm's ``offs``), any size,
0 included. Instead of padding each expert's rows to a multiple of 128 (DeepGEMM), a tile
schedule (``quant_ref.token_tiles``) lists per tile its rows and expert and the ragged tail is
masked; its length is a static bound, so nothing syncs with the host.

- fprop  y[rows_g]  = x_g · w[g]ᵀ           (x 1×128 tiles, w 128×128 blocks)
- dgrad  dx[rows_g] = dy_g · w[g]            (same kernel, b = wᵀ as a strided view)
- wgrad  dw[g]      = dy_gᵀ · x_g            (both 128×1 token tiles per expert, contracting tokens)
Torch references: ``gemm_ref.fp8_grouped_gemm_ref`` / ``fp8_grouped_wgrad_ref``.
``fp8_grouped_mm`` is the autograd entry point (the model's ``grouped_mm_impl`` hook); ``fp8_gate_up`` the
experts' gate and up projections as one GEMM over [w1; w3] on one FP8 copy of x (``GroupedExperts.gate_up``).
A leaf weight (the parameter) is saved as itself and re-quantised in the backward, as fp8_linear does: no
FP8 weight copy per micro-batch in flight (issue 20, memory).
"""
from __future__ import annotations

import torch

import triton_kernels
from triton_kernels._triton_compat import require_triton, tl, triton
from triton_kernels.backend import fp8_ops, resolve_backend
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


class _FP8GroupedMM(torch.autograd.Function):
    """fprop, dgrad and wgrad of the grouped expert GEMM, all three in FP8 (report §3.3.1)."""

    @staticmethod
    def forward(ctx, x, w, offsets, backend, pow2_scale):
        ops = fp8_ops(backend)
        x_fp8, x_s = ops.act_quant(x, pow2_scale=pow2_scale)
        w_fp8, w_s = ops.weight_quant(w)
        y = ops.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, out_dtype=x.dtype)
        triton_kernels.counters["fp8_grouped_mm.fprop"] += 1
        # cache the wgrad operand in FP8 already in its token-tiled, transposed layout
        x_t, x_t_s = ops.act_quant_t(x, offsets) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(x_t, x_t_s, *((w, None) if w.is_leaf else (w_fp8, w_s)), offsets)
        ctx.ops, ctx.x_dtype, ctx.w_dtype = ops, x.dtype, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_t, x_t_s, w_fp8, w_s, offsets = ctx.saved_tensors
        ops, dx, dw = ctx.ops, None, None
        if ctx.needs_input_grad[0]:
            if w_s is None:                          # the parameter: the same quantisation again
                w_fp8, w_s = ops.weight_quant(w_fp8)
            dy_fp8, dy_s = ops.act_quant(dy)
            # a 128×128 block is a block either way round: wᵀ reuses w's FP8 copy and scales;
            # the copy makes the contraction dim contiguous (K-major) for the tensor cores
            w_t = w_fp8.transpose(1, 2).contiguous()
            dx = ops.grouped_gemm(dy_fp8, dy_s, w_t, w_s.transpose(1, 2), offsets, out_dtype=ctx.x_dtype)
            triton_kernels.counters["fp8_grouped_mm.dgrad"] += 1
        if ctx.needs_input_grad[1]:
            dy_t, dy_t_s = ops.act_quant_t(dy, offsets)
            dw = ops.grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, offsets).to(ctx.w_dtype)
            triton_kernels.counters["fp8_grouped_mm.wgrad"] += 1
        return dx, dw, None, None, None


def fp8_grouped_mm(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto",
                   pow2_scale: bool = False) -> torch.Tensor:
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
    return _FP8GroupedMM.apply(x_sorted, w, offsets.to(torch.int32), backend, pow2_scale)


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
    def forward(ctx, x, w1, w3, offsets, backend):
        ops = fp8_ops(backend)
        inter = w1.shape[1]
        n_pad = cdiv(inter, BLOCK) * BLOCK
        x_fp8, x_s = ops.act_quant(x)
        w_fp8, w_s = stacked_weight_quant(ops, w1, w3, x.dtype)
        gu = ops.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, out_dtype=x.dtype)
        triton_kernels.counters["fp8_grouped_mm.fprop"] += 1
        if n_pad != inter:
            gu = torch.cat([gu[:, :inter], gu[:, n_pad:n_pad + inter]], dim=1)
        wants_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        x_t, x_t_s = ops.act_quant_t(x, offsets) if wants_dw else (None, None)
        leaf = w1.is_leaf and w3.is_leaf           # parameters: kept as themselves, re-quantised in backward
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
            w_fp8, w_s = stacked_weight_quant(ops, a, b, ctx.x_dtype) if c is None else (b, c)
            dy_fp8, dy_s = ops.act_quant(dgu)
            dx = ops.grouped_gemm(dy_fp8, dy_s, w_fp8.transpose(1, 2).contiguous(), w_s.transpose(1, 2), offsets,
                                  out_dtype=ctx.x_dtype)
            triton_kernels.counters["fp8_grouped_mm.dgrad"] += 1
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dy_t, dy_t_s = ops.act_quant_t(dgu, offsets)
            dw = ops.grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, offsets).to(ctx.x_dtype)
            triton_kernels.counters["fp8_grouped_mm.wgrad"] += 1
            # in the compute dtype first: the gradient the cast weight got before, bit for bit
            dw1, dw3 = dw[:, :inter].to(ctx.w_dtypes[0]), dw[:, n_pad:n_pad + inter].to(ctx.w_dtypes[1])
        return dx, dw1, dw3, None, None


def fp8_gate_up(x_sorted: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offsets: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """(M, K) tokens sorted by expert, w1 and w3 (E, N, K) (cast to x's dtype inside) -> (M, 2N) [gate | up]."""
    if w1.shape != w3.shape or w1.dim() != 3 or x_sorted.dim() != 2 or x_sorted.shape[1] != w1.shape[2]:
        raise ValueError(f"fp8_gate_up: need x (M, K) and w1 = w3 (E, N, K), got {tuple(x_sorted.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w3.shape)}")
    if offsets.numel() != w1.shape[0]:
        raise ValueError(f"fp8_gate_up: offsets has {offsets.numel()} entries for {w1.shape[0]} experts")
    backend = resolve_backend(backend, x_sorted.device)
    return _FP8GateUp.apply(x_sorted, w1, w3, offsets.to(torch.int32), backend)
