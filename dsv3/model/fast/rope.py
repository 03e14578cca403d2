"""Rotary embedding with a hand-written backward: the fast path behind ``MLA.rotate`` (dsv3.model.mla),
on every device. The forward is ``rope.apply_rope``'s complex multiplication by e^{iθ} (one kernel, bit
for bit the same); the backward is the multiplication by e^{−iθ}, keeping only the (T, 1, d/2) rotation
instead of autograd's complex intermediates.
"""
from __future__ import annotations

import torch


def _as_complex(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.view_as_complex(x.to(dtype).unflatten(-1, (-1, 2)).contiguous())


class _RotatePairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot = torch.complex(cos, sin)[:, None, :]                       # (T, 1, d/2)
        ctx.save_for_backward(rot)
        ctx.x_dtype = x.dtype
        return torch.view_as_real(_as_complex(x, cos.dtype) * rot).flatten(-2).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rot, = ctx.saved_tensors
        dx = torch.view_as_real(_as_complex(grad, rot.real.dtype) * rot.conj()).flatten(-2).to(ctx.x_dtype)
        return dx, None, None


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, H, d) by the (T, d/2) tables, in the tables' dtype, returned in x's."""
    return _RotatePairs.apply(x, cos, sin)
