"""Routed experts stored as stacked weights and run on tokens sorted by expert (grouped GEMM).

``GroupedExperts.gmm`` is the `grouped_mm_impl` hook: a callable (x_sorted, w, offsets) -> y with
w of shape (E, N, K), offsets the int32 cumulative END row of each expert's group (torch._grouped_mm's
``offs``), and rows g of y = x_g @ w[g].T. Implementations here: a per-expert loop (always works,
any dtype), ``grouped_mm_segments`` (one GEMM per group written in place, with a backward that writes
each expert's weight gradient once; the fast path on CPU) and ``torch._grouped_mm``; dsv3.training.precision
swaps in the FP8 grouped GEMM. Under autocast the experts compute in the autocast dtype, as every
other Linear does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.layers import swiglu_packed


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert on its contiguous rows (empty groups allowed)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    outs = [x[s:e] @ w[g].t() for g, (s, e) in enumerate(zip(starts, ends))]
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[1])
    return torch.cat(outs, dim=0)


def _bucket_rows(m: int) -> int:
    """Round a group's row count up to one of ≤ 8 sizes per octave (multiples of ≥ 32): oneDNN's BF16
    GEMMs on CPU JIT-compile one kernel per shape (~0.7 ms each), so a new M every step would compile
    on every call; with buckets the kernels are compiled once and reused (≤ 12.5% padding rows)."""
    if m == 0:
        return 0
    step = max(32, 1 << max(m.bit_length() - 4, 0))
    return -(-m // step) * step


class _SegmentGroupedMM(torch.autograd.Function):
    """y[s_g:e_g] = x[s_g:e_g] @ w[g].T for each group, each GEMM writing its rows of one output buffer.
    Backward: dx rows and dw[g] = dy_g.T @ x_g, each written once (the loop's backward instead adds a
    full-size (E, N, K) gradient per group through the indexing op). With ``padded`` the rows are
    first laid out with each group zero-padded to its bucket size (zero rows add nothing to dw)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bounds: list, padded: bool) -> torch.Tensor:
        rows = None
        if padded:
            sizes = [_bucket_rows(e - s) for s, e in bounds]
            starts = [0]
            for n in sizes[:-1]:
                starts.append(starts[-1] + n)
            rows = torch.cat([torch.arange(p, p + e - s) for p, (s, e) in zip(starts, bounds)]) if bounds else None
            xp = x.new_zeros(sum(sizes), x.shape[1])
            xp.index_copy_(0, rows, x)
            x, bounds = xp, [(p, p + n) for p, n in zip(starts, sizes)]
        y = x.new_empty(x.shape[0], w.shape[1])
        for g, (s, e) in enumerate(bounds):
            if e > s:
                torch.mm(x[s:e], w[g].t(), out=y[s:e])
        ctx.save_for_backward(x, w, rows)
        ctx.bounds = bounds
        return y.index_select(0, rows) if padded else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rows = ctx.saved_tensors
        if rows is not None:
            dy = dy.new_zeros(x.shape[0], dy.shape[1]).index_copy_(0, rows, dy)
        dy = dy.contiguous()
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None   # every row is in one group
        dw = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        for g, (s, e) in enumerate(ctx.bounds):
            if e <= s:
                if dw is not None:
                    dw[g].zero_()                    # an expert without rows gets exactly zero
                continue
            if dx is not None:
                torch.mm(dy[s:e], w[g], out=dx[s:e])
            if dw is not None:
                torch.mm(dy[s:e].t(), x[s:e], out=dw[g])
        if dx is not None and rows is not None:
            dx = dx.index_select(0, rows)
        return dx, dw, None, None


def grouped_mm_segments(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Segment GEMMs; 16-bit operands on CPU get bucketed row counts (see _bucket_rows)."""
    ends = offsets.tolist()
    bounds = list(zip([0] + ends[:-1], ends))
    padded = _cpu16(x) and any(_bucket_rows(e - s) != e - s for s, e in bounds)
    return _SegmentGroupedMM.apply(x.contiguous(), w.contiguous(), bounds, padded)


def _cpu16(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())  # its backward rejects expanded (stride-0) grads
    return y


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm needs fp32/bf16/fp16 operands with 16-byte aligned row strides, and at least
    one row (its backward fails on an empty input, as on an expert-parallel rank that received nothing)."""
    if x.shape[0] == 0:
        return False
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if w.dtype != x.dtype:
        return False
    esize = x.element_size()
    return (x.shape[-1] * esize) % 16 == 0 and (w.shape[1] * esize) % 16 == 0


def grouped_mm_auto(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm where it works. With 16-bit operands on CPU it is a loop of oneDNN GEMMs that
    JIT-compile a kernel for every new row count: it runs only on bucketed groups (local_dispatch pads
    them), other layouts take the segment GEMMs, which bucket internally."""
    if not grouped_mm_supported(x, w):
        return grouped_mm_segments(x, w, offsets)
    if _cpu16(x):
        ends = offsets.tolist()
        if any(_bucket_rows(e - s) != e - s for s, e in zip([0] + ends[:-1], ends)):
            return grouped_mm_segments(x, w, offsets)
    return grouped_mm_torch(x, w, offsets)


GROUPED_MM_IMPLS = {"auto": grouped_mm_auto, "loop": grouped_mm_loop, "segments": grouped_mm_segments,
                    "grouped_mm": grouped_mm_torch}


class GroupedExperts(nn.Module):
    """E SwiGLU experts: w1/w3 (E, inter, dim) gate/up, w2 (E, dim, inter) down."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, impl: str = "auto"):
        super().__init__()
        self.n_experts = n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.gmm = GROUPED_MM_IMPLS[impl]
        # gate_up hook: (x, w1, w3, offsets) -> [gate | up] (M, 2·inter), both projections on one FP8
        # copy of x; swiglu_down hook: ([gate | up], row_weight, w2, offsets) -> y, the SwiGLU and down
        # projection as one op that caches the SwiGLU input in FP8 (report §3.3.3). Both get the
        # parameters themselves and cast them to x's dtype inside (so they can keep the parameter, not a
        # copy, for the backward); dsv3.training.precision sets the FP8 ones.
        self.gate_up: Optional[Callable] = None
        self.swiglu_down: Optional[Callable] = None
        self.recompute = False

    def row_bucket(self, x: torch.Tensor) -> Optional[Callable[[int], int]]:
        """The group-size rounding the grouped GEMM wants for inputs like ``x`` (None: any size)."""
        wants = self.gmm in (grouped_mm_auto, grouped_mm_segments)
        return _bucket_rows if wants and _cpu16(x) else None

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_sorted: (M, dim) rows grouped by expert; tokens_per_expert: (E,) counts summing to M;
        row_weight: optional (M,) gate weight of each row, applied before the (linear) down projection,
        where the activation is inter_dim wide rather than dim wide."""
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        out_dtype, x = x_sorted.dtype, x_sorted
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))    # the GEMM precision of every Linear
        gu = self.gate_up(x, self.w1, self.w3, offsets) if self.gate_up is not None else None
        if self.swiglu_down is not None:        # it keeps no SwiGLU output: recompute would add nothing
            if gu is None:
                gu = torch.cat([self.gmm(x, self.w1.to(x.dtype), offsets), self.gmm(x, self.w3.to(x.dtype), offsets)], 1)
            return self.swiglu_down(gu, row_weight, self.w2, offsets).to(out_dtype)
        w2 = self.w2.to(x.dtype)
        if gu is not None:                      # silu(gate) · (up · w), fp8_swiglu's order (same h)
            gate, up = gu.chunk(2, dim=-1)
            up = up * row_weight.unsqueeze(-1).to(up.dtype) if row_weight is not None else up
            fn, args = _swiglu, (gate, up)
        elif self.gmm in (grouped_mm_auto, grouped_mm_segments) and not (x.device.type == "cpu" and x.dtype == torch.float32):
            # gate and up as one grouped GEMM on [w1; w3] (one pass over x; dx summed inside the GEMM).
            # Not for FP32 on CPU, where concatenating the FP32 weights every step costs more than it
            # saves (benchmarks/bench_moe.py: 1.13× with it, 1.2× without)
            gu = self.gmm(x, torch.cat([self.w1.to(x.dtype), self.w3.to(x.dtype)], dim=1), offsets)
            fn, args = swiglu_packed, (gu, row_weight)
        else:
            gate, up = self.gmm(x, self.w1.to(x.dtype), offsets), self.gmm(x, self.w3.to(x.dtype), offsets)
            if row_weight is not None:
                up = up * row_weight.unsqueeze(-1).to(up.dtype)
            fn, args = _swiglu, (gate, up)
        if self.recompute and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        else:
            h = fn(*args)
        return self.gmm(h, w2, offsets).to(out_dtype)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def local_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   experts: GroupedExperts) -> torch.Tensor:
    """Single-process dispatch/combine: sort (token, choice) rows by expert, run the experts,
    scatter back and sum the k outputs of each token weighted by its gate weights.

    x: (N, dim); topk_idx, topk_weight: (N, k). Returns (N, dim). No token is dropped.
    Under autocast the N tokens are cast once (not the N·k rows) and combined in the autocast dtype,
    as an expert-parallel combine would send them. When the experts want bucketed groups
    (``GroupedExperts.row_bucket``) each group is padded here with rows of gate weight 0 (token 0's
    row: 0 · finite = 0 forward and backward), so the GEMMs need no copy into a padded layout."""
    N, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)            # rows sorted by expert, ties by token
    token = order // k                                  # source token of each sorted row
    counts = torch.bincount(flat, minlength=experts.n_experts)
    weight = topk_weight.reshape(-1).index_select(0, order)
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(x.device.type))
    bucket = experts.row_bucket(x)
    if bucket is not None and N > 0:
        sizes = torch.tensor([bucket(c) for c in counts.tolist()], device=counts.device)
        shift = torch.repeat_interleave((torch.cumsum(sizes, 0) - sizes) - (torch.cumsum(counts, 0) - counts), counts)
        pos = torch.arange(N * k, device=x.device) + shift          # each sorted row's padded position
        token = torch.zeros(int(sizes.sum()), dtype=token.dtype, device=x.device).index_copy_(0, pos, token)
        weight = weight.new_zeros(token.shape[0]).index_copy(0, pos, weight)
        counts = sizes
    # index_select / index_add: their backwards are each other (plain x[idx] would backward via a
    # much slower accumulating index_put)
    y_sorted = experts(x.index_select(0, token), counts, weight)
    return sum_rows(y_sorted.to(x.dtype), token, N).to(out_dtype)


class _SumRows(torch.autograd.Function):
    """out[n] = Σ_{i: index[i] = n} rows[i]; backward: grad.index_select(0, index). torch's index_add
    keeps its whole source for the backward (the formula expands to the source's shape), here the k
    expert output rows per token in the activation dtype; this keeps only the index."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros((n,) + rows.shape[1:]).index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def sum_rows(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(M, ...) rows summed into n rows by ``index`` (M,) — the combine — keeping only the index for backward."""
    return _SumRows.apply(rows, index, n)
