"""Grouped GEMMs for the routed experts, fast: implementations of the ``GroupedExperts.gmm`` hook
(dsv3.model.experts; contract there: rows of group g of y = x_g @ w[g].T, offsets the int32 cumulative END
row of each group) besides the reference per-expert loop ``experts.grouped_mm_loop``:
``grouped_mm_segments`` (one GEMM per group written in place, with a backward that writes each expert's
weight gradient once; the fast path on CPU), ``grouped_mm_torch`` (``torch._grouped_mm``) and
``grouped_mm_auto`` (the second where it works, else the first). tests/test_moe.py checks each against
the loop within its rounding bound.

BF16 / FP16 GEMMs on CPU (oneDNN) compile a kernel per row count, so these implementations want each
group's rows rounded up to a bucket (``_bucket_rows``): their ``row_bucket(x)`` attribute says which
rounding (None: any size), read by ``GroupedExperts.row_bucket``; ``local_dispatch`` then pads the groups
with rows of gate weight 0.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


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


def _row_bucket(x: torch.Tensor) -> Optional[Callable[[int], int]]:
    return _bucket_rows if _cpu16(x) else None


grouped_mm_auto.row_bucket = _row_bucket
grouped_mm_segments.row_bucket = _row_bucket
