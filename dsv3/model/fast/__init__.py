"""The model's speed paths, each behind a named hook of a model module, with the plain formula in that
module as its reference (tests/test_fast_paths.py checks each against it, forward and backward):

    hook                      fast path here                          plain formula (reference)
    RMSNorm.impl              rmsnorm.rms_norm                        layers.rms_norm
    MLA.rotate                rope.rotate_pairs                       rope.apply_rope
    MLA.attention_core        attention_core.cpu_attention (CPU, FP32) attention.attention
                              attention_core.sdpa_attention (elsewhere)
    Linear.shared_input       shared_input.SharedInput (MLA's wq_a/wq + wkv_a)   each Linear on its own
    MLP.swiglu                swiglu.mlp_swiglu                       layers.swiglu
    GroupedExperts.swiglu     swiglu.experts_swiglu                   experts.experts_swiglu
    GroupedExperts.gmm        grouped_mm.grouped_mm_auto (config)     experts.grouped_mm_loop
    experts.sum_rows          combine.sum_rows                        experts.sum_rows_plain
    OutputHead.loss_impl      head_loss.head_cross_entropy            loss.head_cross_entropy

A module's hook is ``auto(name, reference)``: on each call it takes ``default_impls(device, dtype)[name]``
for its first tensor argument, the one rule choosing by device and dtype; an implementation that does not
apply to the call (e.g. no gradient wanted for the fused loss) returns None and the reference runs. Setting
the hook to the reference runs the plain model. The FP8 kernels come in through other hooks
(``Linear.impl``, ``shared_impl``, ``swiglu_down``, ``gate_up``: dsv3.training.precision).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from dsv3.model.fast.combine import sum_rows
from dsv3.model.fast.attention_core import cpu_attention, sdpa_attention
from dsv3.model.fast.head_loss import head_cross_entropy
from dsv3.model.fast.rmsnorm import rms_norm
from dsv3.model.fast.rope import rotate_pairs
from dsv3.model.fast.shared_input import share_input
from dsv3.model.fast.swiglu import experts_swiglu, mlp_swiglu

__all__ = ["auto", "default_impls", "share_input"]


def default_impls(device: torch.device, dtype: torch.dtype) -> dict[str, Optional[Callable]]:
    """The implementation of each hook for inputs on ``device`` of ``dtype`` (None: the plain formula).
    The attention core on CPU computes in FP32 from FP32 or 16-bit inputs (report §3.3: it keeps its
    precision); the experts' packed gate/up GEMM is not for FP32 on CPU (measured slower there)."""
    cpu_fp32_core = device.type == "cpu" and torch.promote_types(dtype, torch.float32) == torch.float32
    return {
        "rms_norm": rms_norm,
        "rotate": rotate_pairs,
        "attention_core": cpu_attention if cpu_fp32_core else sdpa_attention,
        "mlp_swiglu": mlp_swiglu,
        "experts_swiglu": None if device.type == "cpu" and dtype == torch.float32 else experts_swiglu,
        "sum_rows": sum_rows,
        "head_loss": head_cross_entropy,
    }


class auto:  # noqa: N801 - used like a function: ``self.impl = fast.auto("rms_norm", rms_norm)``
    """A hook that runs ``default_impls(x.device, x.dtype)[name]`` (x: the first tensor argument), or
    ``reference`` where that is None or returns None."""

    def __init__(self, name: str, reference: Callable):
        self.name, self.reference = name, reference

    def __call__(self, *args, **kwargs):
        x = next(a for a in args if isinstance(a, torch.Tensor))
        impl = default_impls(x.device, x.dtype)[self.name]
        out = impl(*args, **kwargs) if impl is not None else None
        return self.reference(*args, **kwargs) if out is None else out

    def __repr__(self) -> str:
        return f"fast.auto({self.name!r}, {self.reference.__module__}.{self.reference.__name__})"
