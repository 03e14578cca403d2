"""Modelled compute costs: a module's forward and backward also take a fixed time, slept on the calling
thread, so that 2 shared CPU cores show a schedule (pipeline bubbles, communication hidden under compute;
report §3.2.1) rather than CPU contention. Values pass through unchanged: results stay bitwise those of
the bare modules.

    add_compute_cost(block.attn, 0.02, 0.04)     # every attention call +20 ms forward, +40 ms backward
    y = SleepThrough.apply(x, fwd, bwd)          # the identity that spends them
"""
from __future__ import annotations

import time

import torch
from torch import nn


class SleepThrough(torch.autograd.Function):
    """Identity (a copy) that also spends ``fwd`` seconds in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx, x, fwd: float, bwd: float):
        time.sleep(fwd)
        ctx.bwd = bwd
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd)
        return g, None, None


def add_compute_cost(module: nn.Module, fwd: float, bwd: float):
    """Every call of ``module`` also takes ``fwd`` s, and its backward ``bwd`` s (a forward hook on a
    tensor output; returns the hook's handle)."""
    def hook(_m, _inputs, out):
        return SleepThrough.apply(out, fwd, bwd) if torch.is_tensor(out) else out
    return module.register_forward_hook(hook)
