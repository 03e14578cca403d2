"""Output head + cross-entropy fused and chunked over rows, the fast path behind ``OutputHead.loss_impl``
(dsv3.model.loss) when a gradient is wanted: the (tokens × vocab) logits are never held whole, and
the softmax gradient is formed while each chunk's logits are at hand.

``head_cross_entropy(head, h, targets)`` returns the SUM of the token cross-entropies over targets that are
not ``ignore_index``, as the plain ``dsv3.model.loss.head_cross_entropy`` does, or None where it does not
apply (no gradient wanted, or a head whose ``impl`` is not F.linear: the FP8 kernels). ``_LinearCrossEntropy``,
per chunk of rows: logits = h_c W^T in the GEMM precision (the autocast dtype under autocast, like any
Linear), log-softmax in at least FP32 (report §3.3), then dlogits = softmax − onehot, dh_c = dlogits W and
dW += dlogits^T h_c, all in the forward; backward only scales the stored dh, dW by the incoming gradient.
tests/test_loss.py checks the loss and both gradients against F.cross_entropy on the head's logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_CHUNK_ELEMENTS = 1 << 22   # rows per chunk = this / vocab (at least 128): 16 MB of FP32 logits


def _gemm_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, w.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                gemm_dtype: torch.dtype, chunk: int) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            loss, dh, dw = _LinearCrossEntropy._run(ctx, h, w, targets, ignore_index, gemm_dtype, chunk)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss

    @staticmethod
    def _run(ctx, h, w, targets, ignore_index, gemm_dtype, chunk):
        acc = torch.promote_types(gemm_dtype, torch.float32)
        x_all, wc = h.to(gemm_dtype), w.to(gemm_dtype)
        valid = targets != ignore_index
        tgt = targets.masked_fill(~valid, 0)
        loss = torch.zeros((), dtype=acc, device=h.device)
        dh = torch.empty_like(x_all) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        # one set of chunk buffers reused by every chunk (fresh multi-MB tensors per chunk cost page faults)
        rows = min(chunk, h.shape[0])
        logits = x_all.new_empty(rows, w.shape[0])
        logp = torch.empty(rows, w.shape[0], dtype=acc, device=h.device)
        up = torch.empty_like(logp) if gemm_dtype != acc else None      # the logits upcast, in place
        wgrad = torch.empty(w.shape, dtype=gemm_dtype, device=w.device) if dw is not None and gemm_dtype != acc else None
        for s in range(0, h.shape[0], chunk):
            x, t, v = x_all[s:s + chunk], tgt[s:s + chunk, None], valid[s:s + chunk, None]
            n = x.shape[0]
            lg, lp = logits[:n], logp[:n]
            torch.mm(x, wc.t(), out=lg)
            torch.log_softmax(lg if up is None else up[:n].copy_(lg), dim=-1, out=lp)
            loss -= (lp.gather(1, t) * v).sum()
            probs = lp.exp_()                                      # softmax, in place
            probs.scatter_add_(1, t, probs.new_full(t.shape, -1.0)).mul_(v)
            g = lg.copy_(probs) if gemm_dtype != acc else probs
            if dh is not None:
                torch.mm(g, wc, out=dh[s:s + chunk])
            if dw is not None:
                if wgrad is None:
                    dw.addmm_(g.t(), x)
                else:
                    dw += torch.mm(g.t(), x, out=wgrad)
        return loss, dh, dw

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        dh = None if dh is None else (dh * grad).to(h_dtype)
        dw = None if dw is None else (dw * grad).to(w_dtype)
        return dh, dw, None, None, None, None


def head_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                       ignore_index: int = -100) -> Optional[torch.Tensor]:
    """Sum over valid positions of CE(head(h), targets), h (..., dim), targets (...), fused and chunked;
    None unless the head is plain (``head.impl`` is F.linear, no bias) and a gradient is wanted."""
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    w = head.weight
    fusable = getattr(head, "impl", F.linear) is F.linear and getattr(head, "bias", None) is None
    if not (fusable and torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad)):
        return None
    chunk = max(128, LOGIT_CHUNK_ELEMENTS // w.shape[0])
    return _LinearCrossEntropy.apply(h2, w, t, ignore_index, _gemm_dtype(h2, w), chunk)
