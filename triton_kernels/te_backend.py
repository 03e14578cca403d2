"""``fp8.backend: te`` — the FP8 Linears through NVIDIA Transformer Engine 2.x with its DeepSeek-style
blockwise recipe (``Float8BlockScaling``: 1×128 activation and 128×128 weight tiles, FP32 scales), the peer a
kernel developer compares dsv3's Triton kernels with and the backend an infrastructure team trusts first.

Scope, said plainly: every non-exempt ``Linear`` (attention projections, dense FFNs, shared experts) runs
as a ``transformer_engine.pytorch.Linear`` that holds the model's own weight Parameter (so optimizer,
ZeRO-1 and checkpoints see no difference) under ``fp8_autocast(fp8_recipe=Float8BlockScaling())``. The
routed experts keep dsv3's Triton grouped GEMM: TE's ``GroupedLinear`` owns one weight per expert, not the
(E, N, K) tensor the expert-parallel shards and checkpoints are built on. The precision policy (which
layers stay BF16/FP32) is the same as for every backend (``dsv3.training.precision``). The report's low-precision
caches (``fp8.cache_wo_e5m6``, ``fp8.cache_swiglu_fp8``) are dsv3 kernels that TE's Linear does not run:
with ``te`` they must be switched off (one line, exit 2, otherwise).

Requires a CUDA device of compute capability ≥ 9.0 (Hopper; TE's blockwise FP8 GEMMs) and TE ≥ 2.x
(``pip install -e .[gpu]``). Anything else is one clear line, exit 2.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.errors import UserError


def _te():
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except ImportError:
        raise UserError("fp8.backend=te needs Transformer Engine 2.x with its PyTorch extension: "
                        "pip install -e '.[gpu]' (transformer-engine[pytorch]) on a CUDA machine, "
                        "or use fp8.backend=auto") from None
    return te, Float8BlockScaling


def check_te(device: torch.device, cfg) -> None:
    """Refuses, with one line, every setting the TE backend cannot run."""
    te, _ = _te()
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(f"fp8.backend=te runs on CUDA only (this run is on {device}); use fp8.backend=auto")
    cap = torch.cuda.get_device_capability(device)
    if cap < (9, 0):
        raise UserError(f"fp8.backend=te: Float8BlockScaling needs compute capability >= 9.0 (Hopper), "
                        f"this GPU is {cap[0]}.{cap[1]}")
    on = [k for k in ("cache_wo_e5m6", "cache_swiglu_fp8") if getattr(cfg, k, False)]
    if on:
        raise UserError(f"fp8.backend=te does not run dsv3's low-precision caches; set "
                        f"{' '.join(f'fp8.{k}=false' for k in on)} (or use fp8.backend=auto)")


class TELinearImpl:
    """A ``Linear.impl`` running ``x @ weightᵀ`` through a TE Linear that holds ``weight`` itself. Built at
    the first call (the model may still be on the meta device when the backend is applied, and pipeline
    copies get their own), rebuilt if the Linear's weight Parameter is replaced."""

    def __init__(self):
        self.module = None

    def __call__(self, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        te, recipe = _te()
        if self.module is None or self.module.weight is not weight:
            out_features, in_features = weight.shape
            self.module = te.Linear(in_features, out_features, bias=False, params_dtype=weight.dtype,
                                    device=weight.device)
            self.module.weight = weight    # the model's Parameter: one tensor for optimizer, ZeRO and checkpoints
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe()):
            return self.module(x)

    def __deepcopy__(self, memo):
        return TELinearImpl()             # a copied Linear builds its own TE module around its own weight
