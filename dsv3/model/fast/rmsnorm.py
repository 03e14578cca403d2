"""RMSNorm with a hand-written backward: the fast path behind ``RMSNorm.impl`` (dsv3.model.layers), on
every device. Autograd of the plain formula keeps x, x², the mean and x̂ for its backward; this keeps only
x and the (…, 1) reciprocal RMS. The forward is the same ops in the same order as ``layers.rms_norm``
(bit for bit); tests/test_fast_paths.py and tests/test_layers.py check the backward against autograd of it.
"""
from __future__ import annotations

import torch


class _RMSNormFunction(torch.autograd.Function):
    """y = x · rsqrt(mean(x²) + eps) · w in ≥ FP32, saving only x and the (…, 1) reciprocal RMS; the
    backward is dx = rstd · (g − x̂ · mean(g · x̂)), g = dy · w, dw = Σ dy · x̂."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, w, rstd)
        return (xf * rstd).mul_(w.to(xf.dtype)).to(out_dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        dyf = dy.to(rstd.dtype)
        dw = (dyf * xhat).flatten(0, -2).sum(0).to(w.dtype) if ctx.needs_input_grad[1] else None
        g = dyf * w.to(rstd.dtype)
        c = (g * xhat).mean(-1, keepdim=True).mul_(rstd)
        dx = torch.addcmul(g.mul_(rstd), xhat, c, value=-1).to(x.dtype)     # rstd·(g − x̂·mean(g·x̂))
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``layers.rms_norm`` with the memory-light backward (see _RMSNormFunction)."""
    return _RMSNormFunction.apply(x, weight, eps, out_dtype)
