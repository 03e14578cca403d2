"""Backend switch for the FP8 ops: Triton kernels on a GPU, the torch fake-quant reference on CPU.

backend="auto": triton when the tensor is on a CUDA device with FP8 tensor cores (sm_89 / sm_90
and later) and triton imports, else torch.
backend="triton": the kernels (on CPU only under TRITON_INTERPRET=1 — for tests, far too slow to train).
backend="torch": the references in quant_ref / gemm_ref (same quantisation, FP32 matmul).
backend="te": the Linears through Transformer Engine's Float8BlockScaling (triton_kernels/te_backend.py),
the routed experts through the Triton grouped GEMM; never chosen by "auto".
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

BACKENDS = ("auto", "triton", "torch", "te")   # te: Transformer Engine Linears (triton_kernels/te_backend.py)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"FP8 backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        from triton_kernels._triton_compat import HAS_TRITON
        return "triton" if HAS_TRITON and device.type == "cuda" and _has_fp8_tensor_cores(device) else "torch"
    return backend


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_ops(backend: str) -> SimpleNamespace:
    """The quantise / GEMM functions of one resolved backend, with identical signatures."""
    if backend == "te":
        raise ValueError("fp8.backend=te has no raw quantise/GEMM ops: its Linears are TE modules (te_backend.py)")
    if backend == "triton":
        from triton_kernels import fp8_gemm, grouped_gemm, quant
        return SimpleNamespace(act_quant=quant.act_quant, act_quant_t=quant.act_quant_t,
                               weight_quant=quant.weight_quant, gemm=fp8_gemm.fp8_gemm,
                               grouped_gemm=grouped_gemm.fp8_grouped_gemm,
                               grouped_wgrad=grouped_gemm.fp8_grouped_wgrad)
    from triton_kernels import gemm_ref, quant_ref
    return SimpleNamespace(act_quant=quant_ref.act_quant_ref, act_quant_t=quant_ref.act_quant_t_ref,
                           weight_quant=quant_ref.weight_quant_ref, gemm=gemm_ref.fp8_gemm_ref,
                           grouped_gemm=gemm_ref.fp8_grouped_gemm_ref,
                           grouped_wgrad=gemm_ref.fp8_grouped_wgrad_ref)
