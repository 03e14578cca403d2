"""Linears that read the same input as one GEMM: the fast path behind the ``Linear.shared_input`` hook
(dsv3.model.layers), which MLA sets on its two down-projections (wq_a or wq, and wkv_a: report §2.1.1).

MLA's forward calls them one after the other, as DeepSeek's ``inference/model.py`` does; the first call
runs every Linear of the group on x as one GEMM on their concatenated weights (one input cast and one GEMM
per pass under autocast, the input gradient summed inside the GEMM in FP32) or through their common
``shared_impl`` (FP8: one quantisation of x, one FP8 copy kept for the backward), and hands the others
their outputs when they are called on the same x. Where packing does not pay (CPU outside autocast) each
Linear runs on its own, as the plain model does. tests/test_layers.py and tests/test_fast_paths.py check
the outputs and gradients against separate calls.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def packed_linear(x: torch.Tensor, *linears: nn.Module) -> Optional[torch.Tensor]:
    """The Linears that share input ``x`` as one GEMM on their concatenated weights, outputs side by side
    on the last dim — through their common ``shared_impl`` when they have one (FP8: one quantisation of
    x); None when some Linear has a swapped ``impl`` and no common ``shared_impl``, and on CPU outside
    autocast (measured slower there: benchmarks/README.md)."""
    hook = linears[0].shared_impl
    if hook is not None and all(lin.shared_impl is hook for lin in linears):
        return hook(x, [lin.weight for lin in linears])
    if any(lin.impl is not F.linear for lin in linears):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    if dtype is None and x.device.type == "cpu":
        return None     # without a cast to fuse into, concatenating the weights costs more than it saves on CPU
    return F.linear(x, torch.cat([lin.weight if dtype is None else lin.weight.to(dtype) for lin in linears]))


def shared_input_linears(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    """``[lin(x) for lin in linears]``, as one GEMM where packed_linear can (one input cast and one GEMM
    per pass instead of one per Linear; the input gradient is summed inside the GEMM in FP32), or one
    FP8 quantisation of x for all of them (``shared_impl``)."""
    y = packed_linear(x, *linears) if len(linears) > 1 else None
    if y is None:
        return [lin.impl(x, lin.weight) for lin in linears]
    return list(y.split([lin.out_features for lin in linears], dim=-1))


class SharedInput:
    """The ``shared_input`` hook of a group of Linears: ``group(lin, x)`` is ``lin``'s output on x. The
    first member called on a new x computes the whole group (``shared_input_linears``) when that packs,
    and keeps the other members' outputs until each is asked for once on the same x."""

    def __init__(self, linears: list[nn.Module]):
        self.linears = list(linears)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}    # id(Linear) -> (x, its output)

    def __call__(self, lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
        held = self._pending.pop(id(lin), None)
        if held is not None and held[0] is x:
            return held[1]
        self._pending.clear()
        y = packed_linear(x, *self.linears)
        if y is None:
            return lin.impl(x, lin.weight)
        mine = None
        for other, out in zip(self.linears, y.split([m.out_features for m in self.linears], dim=-1)):
            if other is lin:
                mine = out
            else:
                self._pending[id(other)] = (x, out)
        return mine

    def __deepcopy__(self, memo):       # a copied model gets its own group of the copied Linears, nothing held
        return SharedInput([copy.deepcopy(lin, memo) for lin in self.linears])

    def __getstate__(self):
        return {"linears": self.linears, "_pending": {}}


def share_input(*linears: nn.Module) -> None:
    """Sets one ``SharedInput`` group as the ``shared_input`` hook of each of ``linears``."""
    group = SharedInput(list(linears))
    for lin in linears:
        lin.shared_input = group
