"""dsv3.training.optim.AdamW: its fused path (torch's one-pass kernel, FP32/FP64 moments) equals its per-tensor
path and torch.optim.AdamW over several parameters and steps; fp64 parameters keep fp64 moments."""
from __future__ import annotations

import pytest
import torch

from dsv3.training.optim import AdamW


def _run(dtype, fused: bool, steps=5):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in ((7, 5), (13,), (3, 4, 2))]
    opt = AdamW([dict(params=params[:2], weight_decay=0.1), dict(params=params[2:], weight_decay=0.0)],
                lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    if not fused:
        opt._fusable = lambda ps: False
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_fused_equals_per_tensor_and_torch(dtype, tol):
    fused, opt = _run(dtype, True)
    loop, _ = _run(dtype, False)
    assert opt._fusable([p for p in fused])
    g = torch.Generator().manual_seed(0)
    ref = [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=dtype)) for s in ((7, 5), (13,), (3, 4, 2))]
    topt = torch.optim.AdamW([dict(params=ref[:2], weight_decay=0.1), dict(params=ref[2:], weight_decay=0.0)],
                             lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        for p in ref:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        topt.step()
    for a, b, c in zip(fused, loop, ref):
        assert (a - b).abs().max() <= tol and (a - c).abs().max() <= tol
    assert all(s["exp_avg"].dtype == dtype for s in opt.state.values())
