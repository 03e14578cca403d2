"""Routed experts stored as stacked weights and run on tokens sorted by expert (grouped GEMM).

``GroupedExperts.gmm`` is the `grouped_mm_impl` hook: a callable (x_sorted, w, offsets) -> y with
w of shape (E, N, K), offsets the int32 cumulative END row of each expert's group (torch._grouped_mm's
``offs``), and rows g of y = x_g @ w[g].T. The reference is the per-expert loop here (always works, any
dtype); the others (dsv3/model/fast/grouped_mm.py) are ``grouped_mm_segments`` (one GEMM per group written
in place; the fast path on CPU), ``torch._grouped_mm`` and ``grouped_mm_auto`` (the config's default);
dsv3.training.precision swaps in the FP8 grouped GEMM. Under autocast the experts compute in the autocast
dtype, as every other Linear does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model import fast
from dsv3.model.fast.grouped_mm import _bucket_rows  # noqa: F401 - tests/test_moe.py reads it here
from dsv3.model.fast.grouped_mm import grouped_mm_auto, grouped_mm_segments, grouped_mm_torch


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert on its contiguous rows (empty groups allowed)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    outs = [x[s:e] @ w[g].t() for g, (s, e) in enumerate(zip(starts, ends))]
    if not outs:
        return x.new_zeros(x.shape[0], w.shape[1])
    return torch.cat(outs, dim=0)


GROUPED_MM_IMPLS = {"auto": grouped_mm_auto, "loop": grouped_mm_loop, "segments": grouped_mm_segments,
                    "grouped_mm": grouped_mm_torch}


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def experts_swiglu(x: torch.Tensor, offsets: torch.Tensor, row_weight: Optional[torch.Tensor],
                   experts: "GroupedExperts", recompute: bool = False) -> torch.Tensor:
    """h = silu(x W1_gᵀ) · (x W3_gᵀ · row_weight) for the rows of each expert g, (M, inter): gate and up
    through the FP8 ``gate_up`` hook when set, else two grouped GEMMs. The row weight scales up before the
    product (fp8_swiglu's order). With ``recompute`` (report §3.2.3) only gate and up are kept."""
    if experts.gate_up is not None:
        gate, up = experts.gate_up(x, experts.w1, experts.w3, offsets).chunk(2, dim=-1)
    else:
        gate = experts.gmm(x, experts.w1.to(x.dtype), offsets)
        up = experts.gmm(x, experts.w3.to(x.dtype), offsets)
    if row_weight is not None:
        up = up * row_weight.unsqueeze(-1).to(up.dtype)
    if recompute:
        return torch.utils.checkpoint.checkpoint(_silu_mul, gate, up, use_reentrant=False)
    return _silu_mul(gate, up)


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
        # swiglu hook: (x, offsets, row_weight, experts, recompute) -> h (M, inter); default: gate and up
        # as one grouped GEMM on [w1; w3] with a packed backward where that pays
        self.swiglu: Callable = fast.auto("experts_swiglu", experts_swiglu)

    def row_bucket(self, x: torch.Tensor) -> Optional[Callable[[int], int]]:
        """The group-size rounding the grouped GEMM wants for inputs like ``x`` (None: any size): the
        ``gmm`` implementation's own ``row_bucket`` rule, if it has one."""
        rule = getattr(self.gmm, "row_bucket", None)
        return rule(x) if rule is not None else None

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_sorted: (M, dim) rows grouped by expert; tokens_per_expert: (E,) counts summing to M;
        row_weight: optional (M,) gate weight of each row, applied before the (linear) down projection,
        where the activation is inter_dim wide rather than dim wide."""
        offsets = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        out_dtype, x = x_sorted.dtype, x_sorted
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))    # the GEMM precision of every Linear
        if self.swiglu_down is not None:        # it keeps no SwiGLU output: recompute would add nothing
            if self.gate_up is not None:
                gu = self.gate_up(x, self.w1, self.w3, offsets)
            else:
                gu = torch.cat([self.gmm(x, self.w1.to(x.dtype), offsets), self.gmm(x, self.w3.to(x.dtype), offsets)], 1)
            return self.swiglu_down(gu, row_weight, self.w2, offsets).to(out_dtype)
        w2 = self.w2.to(x.dtype)
        h = self.swiglu(x, offsets, row_weight, self, self.recompute and torch.is_grad_enabled())
        return self.gmm(h, w2, offsets).to(out_dtype)


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


def sum_rows_plain(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out[i] = Σ_{r: index[r] = i} rows[r], (n, ...): the combine of the k expert outputs of each token."""
    return rows.new_zeros((n,) + rows.shape[1:]).index_add(0, index, rows)


# hook: the combine; default keeps only the index for the backward (index_add's keeps its whole source)
sum_rows = fast.auto("sum_rows", sum_rows_plain)
