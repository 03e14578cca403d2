"""The MoE SwiGLU input cached in FP8 with the SwiGLU output recomputed in the backward (report §3.3.3):
the forward is unchanged bit for bit, the gradients are those of the SwiGLU taken at the FP8-rounded
inputs, and the saved-tensor bytes per token of an MoE layer (benchmarks/fp8_memory.py) drop by the
derived formula."""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import pytest
import torch

from dsv3.config import FP8Config, load_config
from dsv3.model.experts import GroupedExperts
from dsv3.model.layers import MLP
from dsv3.model.moe import MoE
from dsv3.training.precision import apply_fp8
from triton_kernels.fp8_linear import fp8_linear
from triton_kernels.fp8_swiglu import fp8_swiglu_down, fp8_swiglu_linear
from triton_kernels.fp8_grouped_mm import fp8_gate_up, fp8_grouped_mm
from triton_kernels.quant_ref import act_dequant_ref, act_quant_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("fp8_memory", os.path.join(ROOT, "benchmarks", "fp8_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FP8RoundTrip(torch.autograd.Function):
    """Forward: the E4M3 1×128 quantise-dequantise; backward: the identity."""

    @staticmethod
    def forward(ctx, t):
        return act_dequant_ref(*act_quant_ref(t), dtype=t.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def _experts_data(E, D, inter, M, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = tuple(torch.randn(s, generator=g) * 0.05 for s in ((E, inter, D), (E, D, inter), (E, inter, D)))
    return ws, torch.randn(M, D, generator=g), torch.rand(M, generator=g), torch.randn(M, D, generator=g)


def _rel(got, want):
    return ((got - want).norm() / want.norm()).item()


def test_forward_unchanged_and_gradients_are_the_swiglu_at_fp8_inputs():
    E, D, inter = 4, 160, 200                                # ragged 128-tiles on both widths
    (w1, w2, w3), x, row_weight, dy = _experts_data(E, D, inter, 300)
    counts = torch.tensor([100, 0, 150, 50])
    offsets = counts.cumsum(0).to(torch.int32)

    experts = GroupedExperts(E, D, inter)
    with torch.no_grad():
        for p, w in zip((experts.w1, experts.w2, experts.w3), (w1, w2, w3)):
            p.copy_(w)
    experts.gmm = functools.partial(fp8_grouped_mm, backend="torch")
    experts.gate_up = functools.partial(fp8_gate_up, backend="torch")
    out = {}
    for cached in (False, True):
        experts.swiglu_down = functools.partial(fp8_swiglu_down, backend="torch") if cached else None
        experts.zero_grad()
        xx, rw = x.clone().requires_grad_(), row_weight.clone().requires_grad_()
        y = experts(xx, counts, rw)
        y.backward(dy)
        out[cached] = (y.detach(), xx.grad, rw.grad, experts.w1.grad.clone(), experts.w2.grad.clone(),
                       experts.w3.grad.clone())
    assert torch.equal(out[True][0], out[False][0])           # the same h, quantised the same way

    # reference: autograd through SwiGLU evaluated at the FP8-rounded gate and up, the same FP8 GEMMs (w1
    # and w3 separately: the fused gate/up GEMM pads each to 128 rows, inter = 200, so no block is shared)
    mm = functools.partial(fp8_grouped_mm, backend="torch")
    xx, rw = x.clone().requires_grad_(), row_weight.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in (w1, w2, w3)]
    gate, up = _FP8RoundTrip.apply(mm(xx, ws[0], offsets)), _FP8RoundTrip.apply(mm(xx, ws[2], offsets))
    mm(torch.nn.functional.silu(gate) * (up * rw.unsqueeze(-1)), ws[1], offsets).backward(dy)
    ref = (xx.grad, rw.grad, ws[0].grad, ws[1].grad, ws[2].grad)
    for name, got, want in zip(("x", "row_weight", "w1", "w2", "w3"), out[True][1:], ref):
        # the same FP32 operations on the same numbers: differences only from summation order
        assert _rel(got, want) < 2.0 ** -20, (name, _rel(got, want))


def test_mlp_forward_unchanged_and_gradients_are_the_swiglu_at_fp8_inputs():
    """The dense FFN / shared expert (MLP.swiglu_down = fp8_swiglu_linear): the output equals the FP8
    Linears' path bit for bit; the gradients are autograd's through SwiGLU at the FP8-rounded gate and up
    with the same FP8 GEMMs (the same FP32 operations: summation order only)."""
    D, inter = 160, 200                                       # ragged 128-tiles on both widths
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=g) * 0.05 for s in ((inter, D), (D, inter), (inter, D))]
    x, dy = torch.randn(1, 130, D, generator=g), torch.randn(1, 130, D, generator=g)
    mlp = MLP(D, inter)
    with torch.no_grad():
        for lin, w in zip((mlp.w1, mlp.w2, mlp.w3), ws):
            lin.weight.copy_(w)
            lin.impl = functools.partial(fp8_linear, backend="torch")
    out = {}
    for cached in (False, True):
        mlp.swiglu_down = functools.partial(fp8_swiglu_linear, backend="torch") if cached else None
        mlp.zero_grad()
        xx = x.clone().requires_grad_()
        y = mlp(xx)
        y.backward(dy)
        out[cached] = (y.detach(), xx.grad, *(lin.weight.grad.clone() for lin in (mlp.w1, mlp.w2, mlp.w3)))
    lin = functools.partial(fp8_linear, backend="torch")
    with torch.no_grad():                        # h from the halves of one [gate | up], as the op takes it
        gu = torch.cat([lin(x, ws[0]), lin(x, ws[2])], dim=-1)
        assert torch.equal(out[True][0], lin(torch.nn.functional.silu(gu[..., :inter]) * gu[..., inter:], ws[1]))
    # against the uncached MLP's separate gate and up: CPU silu on a ragged strided half may differ from
    # one on a contiguous tensor in the last bit, then in an FP8 rounding of h
    assert _rel(out[True][0], out[False][0]) < 2.0 ** -4
    xx, w = x.clone().requires_grad_(), [t.clone().requires_grad_() for t in ws]
    gate, up = _FP8RoundTrip.apply(lin(xx, w[0])), _FP8RoundTrip.apply(lin(xx, w[2]))
    lin(torch.nn.functional.silu(gate) * up, w[1]).backward(dy)
    for name, got, want in zip(("x", "w1", "w2", "w3"), out[True][1:], (xx.grad, w[0].grad, w[1].grad, w[2].grad)):
        assert _rel(got, want) < 2.0 ** -20, (name, _rel(got, want))


@pytest.mark.parametrize("inter", [256, 200])
def test_gate_up_is_the_two_projections_on_one_fp8_copy(inter):
    """[gate | up] equals the separate w1 and w3 FP8 GEMMs bit for bit (the same FP8 x, the same 128×128
    weight blocks: a ragged inter is padded to 128 rows per weight); the gradients are theirs up to FP32
    summation order (dx sums both projections inside one GEMM of K = 2·inter instead of adding two)."""
    E, D = 3, 160
    (w1, _, w3), x, _, _ = _experts_data(E, D, inter, 200, seed=1)
    offsets = torch.tensor([70, 70, 200], dtype=torch.int32)
    dgu = torch.randn(200, 2 * inter, generator=torch.Generator().manual_seed(2))
    got, want = {}, {}
    for fused, res in ((True, got), (False, want)):
        xx, a, b = (t.clone().requires_grad_() for t in (x, w1, w3))
        if fused:
            gu = fp8_gate_up(xx, a, b, offsets, backend="torch")
        else:
            gu = torch.cat([fp8_grouped_mm(xx, w, offsets, backend="torch") for w in (a, b)], 1)
        gu.backward(dgu)
        res.update(gu=gu.detach(), x=xx.grad, w1=a.grad, w3=b.grad)
    assert torch.equal(got["gu"], want["gu"])
    for name in ("x", "w1", "w3"):
        assert _rel(got[name], want[name]) < 2.0 ** -20, (name, _rel(got[name], want[name]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # the training precision: BF16 GEMMs
        xb = x.bfloat16()
        fused = fp8_gate_up(xb, w1, w3, offsets, backend="torch")
        split = torch.cat([fp8_grouped_mm(xb, w.bfloat16(), offsets, backend="torch") for w in (w1, w3)], 1)
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, split)


def test_switch_sets_the_hook():
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"))
    for on in (True, False):
        moe = MoE(cfg.model.dim, cfg.model.moe)
        apply_fp8(moe, FP8Config(enabled=True, backend="torch", cache_swiglu_fp8=on))
        assert (moe.experts.swiglu_down is not None) == on
        assert (moe.shared_experts.swiglu_down is not None) == on     # the shared expert: an MLP


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_bytes_saving_equals_the_formula(dtype):
    bench = _load_benchmark()
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"))
    k, I = cfg.model.moe.n_activated_experts, cfg.model.moe.moe_inter_dim
    b = torch.empty(0, dtype=dtype).element_size()
    # per routed row: [gate | up], silu(gate), up·w (b·I each), the cast row weight (b) and h's token-tiled
    # FP8 copy (I bytes + 4 per 128) are no longer kept; gate and up in E4M3 (I bytes + 4 per 1×128 tile
    # each) and the FP32 row weight (4) are
    per_row = (4 * b * I + b + I + 4 * I / 128) - (2 * (I + 4 * math.ceil(I / 128)) + 4)
    # per token, the shared expert (an MLP, Is wide; its FP8 Linears output the input's FP32): [gate | up]
    # (the packed SwiGLU's input, 2·4·Is) and h's token-tiled FP8 copy are no longer kept; gate and up in
    # E4M3 are
    Is = cfg.model.moe.n_shared_experts * I
    shared = (2 * 4 * Is + Is + 4 * Is / 128) - 2 * (Is + 4 * math.ceil(Is / 128))
    r = bench.measure(cfg, dtype, (128, 256))
    assert abs(r["saving"] / (k * per_row + shared) - 1) <= 0.05, (r, k * per_row + shared)
    assert r["after"] < r["before"]
