"""Per-pass precision of the FP8 GEMMs: fprop, dgrad and wgrad each through the backend's FP8 ops or
through ``HIGH``, the same signatures with no quantisation (operands in their own dtype — the autocast
dtype, BF16 or FP32 — and FP32 accumulation as the baseline's GEMMs do).

Transformer Engine's recipes carry the same switch per Linear (``override_linear_precision`` =
(fprop, dgrad, wgrad)); here it is per GEMM class — attention, dense, experts — through ``fp8.high_precision``
(dsv3.training.precision), so a loss gap can be traced to the class and pass that carries it (issue 19,
item 4). The FP8 *storage* choices (wo's E5M6 cache, the SwiGLU input's FP8 cache) are not passes: they stay
as configured, except the copy of the input that a high-precision wgrad reads, which is kept as it is.

``HIGH``'s scales are FP32 ones with the FP8 scales' number of dims (every transpose and concatenation
of a scale in the kernels works on them); its GEMMs ignore them.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

import triton_kernels
from triton_kernels.backend import fp8_ops
from triton_kernels.gemm_ref import grouped_rows_mm, grouped_tokens_mm
from triton_kernels.quant_ref import BLOCK

PASSES = ("fprop", "dgrad", "wgrad")


def _ones(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return torch.ones((1,) * ndim, dtype=torch.float32, device=t.device)


def act_quant(x, block: int = BLOCK, pow2_scale: bool = False):
    return x, _ones(x, x.dim())


def act_quant_t(x, offsets=None, block: int = BLOCK, pow2_scale: bool = False):
    return x.t().contiguous(), _ones(x, 2)


def weight_quant(w, block: int = BLOCK):
    return w, _ones(w, w.dim())


def gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, block: int = BLOCK):
    """(M, K) × (N, K)ᵀ in a's dtype (b cast to it, as autocast casts the weight)."""
    return (a @ b.to(a.dtype).t()).to(out_dtype)


def grouped_gemm(a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16, block: int = BLOCK):
    """Rows of group g times b[g]ᵀ: (M, K) × (E, N, K) -> (M, N), in a's dtype."""
    return grouped_rows_mm(a, b.to(a.dtype), offsets).to(out_dtype)


def grouped_wgrad(dy_t, dy_t_scale, x_t, x_t_scale, offsets, block: int = BLOCK):
    """dW[g] = dy_gᵀ · x_g over each group's own tokens: (N, M), (K, M) -> (E, N, K) FP32."""
    return grouped_tokens_mm(dy_t, x_t.to(dy_t.dtype), offsets)


HIGH = SimpleNamespace(act_quant=act_quant, act_quant_t=act_quant_t, weight_quant=weight_quant, gemm=gemm,
                       grouped_gemm=grouped_gemm, grouped_wgrad=grouped_wgrad)


def check_passes(high) -> frozenset:
    high = frozenset(high)
    bad = sorted(high - set(PASSES))
    if bad:
        raise ValueError(f"high-precision passes must be among {PASSES}, got {bad}")
    return high


def pass_ops(backend: str, high: frozenset = frozenset()) -> SimpleNamespace:
    """``high``: passes already checked (check_passes, by the public ops). The ops of each pass (``.fprop``, ``.dgrad``, ``.wgrad``), ``.fp8`` for FP8 storage, ``.high`` the set of
    passes in high precision and ``.count(op, pass)``, which counts the GEMM under ``counters`` as
    ``op.pass`` (FP8) or ``op.pass.high_precision``."""
    fp8 = fp8_ops(backend)
    ops = SimpleNamespace(**{p: HIGH if p in high else fp8 for p in PASSES}, fp8=fp8, high=high)

    def count(op: str, pass_: str) -> None:
        triton_kernels.counters[f"{op}.{pass_}" + (".high_precision" if pass_ in high else "")] += 1
    ops.count = count
    return ops
