"""Saved-tensor bytes per token of one MoE layer under FP8, with and without caching the SwiGLU input
in FP8 (``fp8.cache_swiglu_fp8``, DeepSeek-V3 report §3.3.3), counted through
``torch.autograd.graph.saved_tensors_hooks`` (each storage once) at two token counts; the difference
divided by the token difference removes what does not grow with tokens (FP8 weight copies, tile
bounds). No optimizer, no data: one MoE layer of the config, random tokens, training mode.

    python benchmarks/fp8_memory.py [--config configs/small_moe.yaml] [--dtype bf16|fp32] [--tokens 1024 2048]
                                    [--set model.moe.n_routed_experts=16 ...]

Prints bytes per token before / after, their ratio, and the saving against the formula below.

The formula (per routed row, i.e. per token copy sent to one of its k experts; I = moe_inter_dim,
b = bytes per element in the autocast dtype, r = bytes of the gate weight the layer passes):

    before  the unfused graph keeps [gate | up] (2·b·I, the gate/up GEMM's one output), silu(gate) and
            up·w (b·I each: the product's two operands), the cast row weight (b) and the token-tiled FP8
            copy of h = silu(gate)·up·w that the down projection's wgrad reads (I bytes + one FP32 scale
            per 128 tokens of a channel)
    after   gate and up in E4M3 (I bytes each + one FP32 scale per 1×128 tile) and the row weight (r);
            h is recomputed in the backward

    saving per row = 4·b·I + b + I·(1 + 4/128) − 2·(I + 4·ceil(I/128)) − r

Both keep the one token-tiled FP8 copy of x that the gate/up GEMM over [w1; w3] reads for wgrad, and no
FP8 weight copy (the parameters are re-quantised in the backward). "before" and "after" are the whole
MoE layer's bytes per token (router, routed and shared experts, combine), the FFN half of a Block.

The issue's shorthand (the [gate | up] input at 2·I elements in the autocast dtype against 1 byte plus
a 4-byte scale per 128, and no SwiGLU output) is the 2·b·I − 2·I·(1 + 4/128) part of it; the other terms
are what this code's autograd graph actually held (silu(gate), up·w, the FP8 copy of h).
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import math
import os
import sys
from dataclasses import replace

import torch

from dsv3.config import load_config
from dsv3.errors import UserError
from dsv3.model.moe import MoE
from dsv3.training.precision import apply_fp8

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def saving_per_row(inter_dim: int, elem_bytes: int, row_weight_bytes: int = 4) -> float:
    """The formula of the module docstring, bytes per routed row."""
    I, b = inter_dim, elem_bytes
    before = 4 * b * I + b + I * (1 + 4 / 128)
    after = 2 * (I + 4 * math.ceil(I / 128)) + row_weight_bytes
    return before - after


def saved_bytes(moe: MoE, tokens: int, dtype: torch.dtype, seed: int = 0) -> int:
    """Bytes of the distinct storages autograd saves for one forward of ``moe`` on ``tokens`` tokens."""
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor):
        # holding the storage keeps its address from being reused by a later allocation
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage
        return t

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, moe.gate.weight.shape[1], generator=g, requires_grad=True)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        moe(x)
    return sum(s.nbytes() for s in seen.values())


def bytes_per_token(cfg, cache_swiglu_fp8: bool, dtype: torch.dtype, tokens: tuple[int, int]) -> float:
    torch.manual_seed(0)
    moe = MoE(cfg.model.dim, cfg.model.moe)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    apply_fp8(moe, replace(cfg.fp8, enabled=True, backend="torch", cache_swiglu_fp8=cache_swiglu_fp8))
    moe.train()
    n1, n2 = tokens
    return (saved_bytes(moe, n2, dtype) - saved_bytes(moe, n1, dtype)) / (n2 - n1)


def measure(cfg, dtype: torch.dtype, tokens: tuple[int, int]) -> dict:
    before = bytes_per_token(cfg, False, dtype, tokens)
    after = bytes_per_token(cfg, True, dtype, tokens)
    k, I = cfg.model.moe.n_activated_experts, cfg.model.moe.moe_inter_dim
    b = torch.empty(0, dtype=dtype).element_size()
    # the gate weights reach the experts in the residual stream's dtype (FP32 here)
    # + the shared experts (an MLP, same cache; [gate | up] comes out of its FP8 Linears in x's FP32):
    # [gate | up] and h's FP8 copy before, gate and up in E4M3 after, per token
    Is = cfg.model.moe.n_shared_experts * I
    shared = saving_per_row(Is, 4, row_weight_bytes=0) - 2 * 4 * Is - 4 if Is else 0.0
    return {"before": before, "after": after, "ratio": after / before, "saving": before - after,
            "formula": k * saving_per_row(I, b, row_weight_bytes=4) + shared}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "small_moe.yaml"))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tokens", type=int, nargs=2, default=[1024, 2048])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. fewer routed experts so a 671B-wide layer fits in CPU memory")
    args = ap.parse_args(argv)
    if not 0 < args.tokens[0] < args.tokens[1]:
        print("fp8_memory: --tokens needs two counts 0 < n1 < n2", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.set)
    except UserError as e:
        print(f"fp8_memory: {e}", file=sys.stderr)
        return 2
    m = cfg.model.moe
    r = measure(cfg, DTYPES[args.dtype], tuple(args.tokens))
    print(f"config {os.path.relpath(args.config, REPO)}: dim {cfg.model.dim}, moe_inter_dim {m.moe_inter_dim}, "
          f"top-{m.n_activated_experts} of {m.n_routed_experts}, {m.n_shared_experts} shared; autocast {args.dtype}; "
          f"tokens {args.tokens[0]} -> {args.tokens[1]}")
    print(f"saved bytes per token per MoE layer: before {r['before']:.1f}, after {r['after']:.1f}")
    print(f"saving {r['saving']:.1f} B/token, formula {r['formula']:.1f} B/token "
          f"({100 * (r['saving'] / r['formula'] - 1):+.2f}%)")
    print(f"ratio after/before: {r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
