"""fp8.high_precision: one pass (fprop, dgrad, wgrad) of one GEMM class left unquantised
(triton_kernels/high_precision.py), the switch the FP8 loss-gap study uses to find the class and pass that
carry a gap (issue 19 item 4; TE's override_linear_precision per class).

For a fixed upstream gradient, y depends only on the fprop, the input gradient only on the dgrad and the
weight gradient only on the wgrad: switching one pass must leave the other two bit for bit as in the all-FP8
op, and give the switched one as the unquantised GEMM."""
from __future__ import annotations

import os

import pytest
import torch

import triton_kernels
import triton_kernels.high_precision as HP
from dsv3.config import FP8_PASSES, ConfigError, load_config
from dsv3.model.transformer import Transformer
from dsv3.training.precision import apply_fp8, gemm_classes
from triton_kernels.fp8_grouped_mm import fp8_gate_up, fp8_grouped_mm
from triton_kernels.fp8_linear import fp8_linear, fp8_linear_shared
from triton_kernels.fp8_swiglu import _dequant_halves, _quant_halves, _swiglu, fp8_swiglu_down, fp8_swiglu_linear
from triton_kernels.backend import fp8_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0 ** -24                      # FP32 unit roundoff
OFFSETS = torch.tensor([70, 70, 200, 256], dtype=torch.int32)   # an empty expert, ragged 128-token tiles


def _t(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale)


def _run(op, inputs: list, high, g):
    """y and the gradients of every input, for upstream gradient g."""
    leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    y = op(*leaves, high)
    y.backward(g)
    return [y.detach()] + [t.grad for t in leaves if t.is_floating_point()]


def _bound(a, b):
    """|a·bᵀ − fl(a·bᵀ)| ≤ K·u·(|a|·|b|ᵀ) for FP32 sums of K products in any order (both results rounded)."""
    return 2 * a.shape[-1] * U * (a.abs() @ b.abs().t())


# op, its inputs, which outputs each pass decides: [y, grads...] -> pass (None: several passes)
def _cases():
    x, w, w3 = _t(256, 320, seed=1), _t(192, 320, seed=2, scale=0.05), _t(192, 320, seed=3, scale=0.05)
    xe, we, we3 = _t(256, 160, seed=4), _t(4, 96, 160, seed=5, scale=0.05), _t(4, 96, 160, seed=6, scale=0.05)
    gu, w2, rw = _t(256, 2 * 96, seed=7), _t(4, 160, 96, seed=8, scale=0.05), torch.rand(256)
    gud, w2d = _t(256, 2 * 96, seed=9), _t(160, 96, seed=10, scale=0.05)
    T = "torch"
    return {
        "linear": (lambda x, w, h: fp8_linear(x, w, T, high_precision=h), [x, w], ["fprop", "dgrad", "wgrad"]),
        "linear_e5m6": (lambda x, w, h: fp8_linear(x, w, T, input_cache="e5m6", high_precision=h), [x, w],
                        ["fprop", "dgrad", "wgrad"]),
        "shared": (lambda x, a, b, h: fp8_linear_shared(x, [a, b], T, high_precision=h), [x, w, w3],
                   ["fprop", "dgrad", "wgrad", "wgrad"]),
        "grouped": (lambda x, w, h: fp8_grouped_mm(x, w, OFFSETS, T, pow2_scale=True, high_precision=h), [xe, we],
                    ["fprop", "dgrad", "wgrad"]),
        "gate_up": (lambda x, a, b, h: fp8_gate_up(x, a, b, OFFSETS, T, high_precision=h), [xe, we, we3],
                    ["fprop", "dgrad", "wgrad", "wgrad"]),
        # dgu is the SwiGLU backward of dh (dgrad); the row weight's gradient too
        "swiglu_down": (lambda g, r, w, h: fp8_swiglu_down(g, r, w, OFFSETS, T, high_precision=h), [gu, rw, w2],
                        ["fprop", "dgrad", "dgrad", "wgrad"]),
        "swiglu_linear": (lambda g, w, h: fp8_swiglu_linear(g, w, T, high_precision=h), [gud, w2d],
                          ["fprop", "dgrad", "wgrad"]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_one_pass_switched_leaves_the_others_bit_for_bit(name):
    op, inputs, owner = _cases()[name]
    g = _upstream(op, inputs)
    fp8 = _run(op, inputs, (), g)
    high_all = _run(op, inputs, HP.PASSES, g)
    for p in HP.PASSES:
        got = _run(op, inputs, (p,), g)
        for i, who in enumerate(owner):
            want = high_all[i] if who == p else fp8[i]
            assert torch.equal(got[i], want), (name, p, i, who)
    # and the switch changed what it owns: FP8 rounding (2⁻⁴ relative per element) is far above FP32's
    for i in range(len(owner)):
        assert not torch.equal(fp8[i], high_all[i]), (name, i)


def _upstream(op, inputs):
    with torch.no_grad():
        y = op(*inputs, ())
    return _t(*y.shape, seed=99)


def test_high_precision_linear_and_grouped_are_the_plain_gemms():
    """All three passes unquantised: fp8_linear and fp8_grouped_mm give x·Wᵀ, dy·W and dyᵀ·x within FP32's
    summation-order bound (nothing left of FP8's 2⁻⁴)."""
    x, w = _t(256, 320, seed=1), _t(192, 320, seed=2, scale=0.05)
    g = _t(256, 192, seed=3)
    y, dx, dw = _run(lambda a, b, h: fp8_linear(a, b, "torch", high_precision=h), [x, w], HP.PASSES, g)
    for got, a, b in ((y, x, w), (dx, g, w.t()), (dw, g.t(), x.t())):
        assert ((got - a @ b.t()).abs() <= _bound(a, b)).all()
    xe, we = _t(256, 160, seed=4), _t(4, 96, 160, seed=5, scale=0.05)
    ge = _t(256, 96, seed=6)
    y, dx, dw = _run(lambda a, b, h: fp8_grouped_mm(a, b, OFFSETS, "torch", high_precision=h), [xe, we], HP.PASSES, ge)
    ends = [0] + OFFSETS.tolist()
    for e, (s, t) in enumerate(zip(ends[:-1], ends[1:])):
        for got, a, b in ((y[s:t], xe[s:t], we[e]), (dx[s:t], ge[s:t], we[e].t()), (dw[e], ge[s:t].t(), xe[s:t].t())):
            assert ((got - a @ b.t()).abs() <= _bound(a, b)).all(), e


def test_high_precision_swiglu_down_reads_the_fp8_cached_input():
    """[gate | up] stays cached in FP8 (storage, not a pass): the unquantised wgrad is dyᵀ·h with h recomputed
    from the FP8 round trip of gate and up; the unquantised fprop is h·w2ᵀ from the exact gate and up."""
    gu, w2 = _t(256, 2 * 96, seed=7), _t(160, 96, seed=8, scale=0.05)
    g = _t(256, 160, seed=9)
    y, _, dw2 = _run(lambda a, b, h: fp8_swiglu_linear(a, b, "torch", high_precision=h), [gu, w2], HP.PASSES, g)
    h = _swiglu(gu[:, :96], gu[:, 96:], None)[2]
    assert ((y - h @ w2.t()).abs() <= _bound(h, w2)).all()
    h_q = _swiglu(*_dequant_halves(*_quant_halves(fp8_ops("torch"), gu), torch.float32), None)[2]
    assert ((dw2 - g.t() @ h_q).abs() <= _bound(g.t(), h_q.t())).all()
    assert not torch.equal(h_q, h)


def test_config_names_and_the_model_classes():
    assert FP8_PASSES == HP.PASSES
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"),
                      ["fp8.high_precision=[attention.fprop, dense.wgrad, experts.dgrad]"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    counts = apply_fp8(model, cfg.fp8)
    classes = list(gemm_classes(model).values())
    n_att, n_dense = classes.count("attention"), classes.count("dense")
    assert n_att > 0 and n_dense > 0 and n_att + n_dense == counts["fp8_linear"]
    triton_kernels.reset_counters()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    c = triton_kernels.counters
    assert c["fp8_linear.fprop.high_precision"] == n_att and c["fp8_linear.fprop"] == n_dense
    assert c["fp8_linear.wgrad.high_precision"] == n_dense and c["fp8_linear.wgrad"] == n_att
    assert c["fp8_linear.dgrad"] > 0 and "fp8_linear.dgrad.high_precision" not in c
    assert c["fp8_grouped_mm.dgrad.high_precision"] > 0 and "fp8_grouped_mm.dgrad" not in c
    assert c["fp8_grouped_mm.fprop"] == c["fp8_grouped_mm.wgrad"] == 2 * counts["fp8_grouped"]
    for bad in ("attention.backward", "head.fprop", "attention"):
        with pytest.raises(ConfigError, match=r"fp8\.high_precision: .* is not CLASS\.PASS"):
            load_config(None, [f"fp8.high_precision=[{bad}]"])
    with pytest.raises(ConfigError, match="not available with fp8.backend=te"):
        load_config(None, ["fp8.backend=te", "fp8.high_precision=[dense.fprop]"])
