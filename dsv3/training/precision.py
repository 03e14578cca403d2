"""Precision policy (report §3.3.1, Figure 6): FP8 (E4M3) for every GEMM of the attention projections,
dense FFNs, shared and routed experts — fprop, dgrad and wgrad, 1×128 activation and 128×128 weight
scales — while the embedding, output head, MoE gate, normalisations, the core attention (QKᵀ, softmax,
·V) and the MTP eh_proj stay in BF16/FP32. Applied by swapping the model's hooks, so model files
never import the kernels: ``Linear.impl`` (linear_impl) and ``GroupedExperts.gmm`` (grouped_mm_impl).

Low-precision storage (report §3.3.3): with ``fp8.cache_wo_e5m6`` the input of MLA's output
projection ``wo`` is cached in E5M6 (triton_kernels.e5m6_ref); with ``fp8.cache_swiglu_fp8`` the
routed experts, the dense FFNs and the shared experts cache their SwiGLU input in FP8 and recompute
its output in the backward (``GroupedExperts.swiglu_down`` / ``MLP.swiglu_down`` = triton_kernels.fp8_swiglu).

``fp8.high_precision`` leaves chosen passes (fprop, dgrad, wgrad) of one GEMM class unquantised: attention
(MLA's Linears), dense (the dense FFNs' and shared experts' Linears), experts (the routed grouped GEMMs) —
triton_kernels.high_precision; a diagnostic for where an FP8 loss gap comes from.

On CPU the kernels' torch fake-quant reference runs (backend "auto"); on a GPU the Triton kernels.
"""
from __future__ import annotations

import functools

from torch import nn

from dsv3.config import FP8Config, fp8_high_precision
from dsv3.model.experts import GroupedExperts
from dsv3.model.layers import MLP, Linear
from dsv3.model.mla import MLA


def apply_fp8(model: nn.Module, cfg: FP8Config, device=None) -> dict:
    """Route every non-exempt Linear and every routed-expert GEMM through FP8. Returns the counts
    {"fp8_linear": n, "exempt_linear": n, "fp8_grouped": n} of modules switched or kept.
    ``fp8.backend=te``: the Linears through Transformer Engine on ``device`` (triton_kernels/te_backend.py)."""
    from triton_kernels.fp8_linear import fp8_linear, fp8_linear_shared
    from triton_kernels.fp8_swiglu import fp8_swiglu_down, fp8_swiglu_linear
    from triton_kernels.fp8_grouped_mm import fp8_gate_up, fp8_grouped_mm

    wo_inputs: set = set()     # Linears whose input is cached in E5M6: each quantises its own
    high = fp8_high_precision(cfg)
    classes = gemm_classes(model)
    if cfg.backend == "te":   # TE Linears; routed experts on the Triton grouped GEMM; caches refused by check_te
        import torch
        from triton_kernels.te_backend import TELinearImpl, check_te
        check_te(torch.device(device) if device is not None else torch.device("cpu"), cfg)
        linear_for = lambda module: TELinearImpl()   # noqa: E731 - one TE module per Linear
        grouped = functools.partial(fp8_grouped_mm, backend="triton")
    else:
        if cfg.block != 128:
            raise ValueError(f"fp8.block={cfg.block}: the kernels implement the report's 128 (1×128 and 128×128 tiles)")
        wo_inputs = {id(m.wo) for m in model.modules() if isinstance(m, MLA)} if cfg.cache_wo_e5m6 else set()

        linear_for = lambda module: functools.partial(  # noqa: E731
            fp8_linear, backend=cfg.backend, high_precision=high[classes.get(id(module), "dense")],
            **({"input_cache": "e5m6"} if id(module) in wo_inputs else {}))
        grouped = functools.partial(fp8_grouped_mm, backend=cfg.backend, high_precision=high["experts"])
    # Linears sharing an input (MLA's wq_a / wkv_a, an MLP's w1 / w3) quantise it once (issue 20, memory):
    # one hook object per GEMM class: layers.gate_up and fast.shared_input match the Linears by its identity
    shared = {c: functools.partial(fp8_linear_shared, backend=cfg.backend, high_precision=hp) for c, hp in high.items()}
    shared_for = lambda module: None if cfg.backend == "te" else shared[classes.get(id(module), "dense")]  # noqa: E731
    counts = {"fp8_linear": 0, "exempt_linear": 0, "fp8_grouped": 0}
    for module in model.modules():
        if isinstance(module, Linear):
            if module.fp8_exempt:
                counts["exempt_linear"] += 1
            else:
                module.impl = linear_for(module)
                module.shared_impl = None if id(module) in wo_inputs else shared_for(module)
                counts["fp8_linear"] += 1
        elif isinstance(module, GroupedExperts):
            module.gmm = grouped
            # gate and up on one FP8 copy of x: one grouped GEMM over [w1; w3] (issue 20, memory)
            module.gate_up = functools.partial(fp8_gate_up, backend=grouped.keywords["backend"],
                                               high_precision=high["experts"])
            if cfg.cache_swiglu_fp8:
                module.swiglu_down = functools.partial(fp8_swiglu_down, backend=cfg.backend,
                                                       high_precision=high["experts"])
            counts["fp8_grouped"] += 1
        elif isinstance(module, MLP) and cfg.cache_swiglu_fp8:      # dense FFNs, shared experts
            module.swiglu_down = functools.partial(fp8_swiglu_linear, backend=cfg.backend, high_precision=high["dense"])
    return counts


def gemm_classes(model: nn.Module) -> dict[int, str]:
    """id(Linear) -> its GEMM class for fp8.high_precision: "attention" inside an MLA, "dense" inside an MLP (the
    dense FFNs and the shared experts); a Linear in neither (none in this model but the exempt ones) counts as
    dense. The routed experts are GroupedExperts, class "experts"."""
    out = {}
    for m in model.modules():
        if isinstance(m, (MLP, MLA)):    # neither holds the other
            name = "dense" if isinstance(m, MLP) else "attention"
            out.update({id(sub): name for sub in m.modules() if isinstance(sub, Linear)})
    return out
