"""The MoE combine with a hand-written backward: the fast path behind ``experts.sum_rows`` (every device).
torch's index_add keeps its whole source for the backward (the formula expands to the source's shape),
here the k expert output rows per token in the activation dtype; ``_SumRows`` keeps only the index. The
forward is ``experts.sum_rows_plain``'s index_add (bit for bit); its backward is the index_select.
"""
from __future__ import annotations

import torch


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
