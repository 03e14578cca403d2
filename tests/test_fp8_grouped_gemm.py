"""FP8 grouped GEMM for MoE experts (TRITON_INTERPRET=1 on CPU) against torch references.

Contiguous layout (DeepGEMM): tokens sorted by expert, 128-token tiles never straddle two experts.
"""
import importlib.util
import os
import platform

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import pytest
import torch

import triton_kernels
from triton_kernels import gemm_ref as G
from triton_kernels import quant_ref as R

if importlib.util.find_spec("triton") is None:  # declared on Linux (pyproject.toml): missing there fails
    if platform.system() == "Linux":
        pytest.fail("triton is not installed, but pyproject.toml declares it on Linux", pytrace=False)
    pytest.skip(f"triton is not a dependency on {platform.system()}", allow_module_level=True)
from triton_kernels import fp8_grouped_mm as GM  # noqa: E402
from triton_kernels import grouped_gemm as GG  # noqa: E402

# expert sizes 0, 3, 0, 147, 1, 139: empty first/middle/last-but-one groups, a ragged 128-tile tail
OFFSETS = torch.tensor([0, 3, 3, 150, 151, 290], dtype=torch.int32)
M, N, K = 290, 70, 200


def _rel_fro(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _loop_mm(x, w, offsets):
    """FP64 per-expert matmul: the unquantised truth."""
    ends = offsets.tolist()
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    for g, (s, e) in enumerate(zip([0] + ends[:-1], ends)):
        out[s:e] = x[s:e].double() @ w[g].double().t()
    return out


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (1 + 5 * torch.rand(M, 1, generator=g))
    w = torch.randn(len(OFFSETS), N, K, generator=g) * (1 + 5 * torch.rand(len(OFFSETS), 1, 1, generator=g))
    return x, w


def test_grouped_fprop_kernel_matches_reference():
    x, w = _data(0)
    x_fp8, x_s = R.act_quant_ref(x)
    w_fp8, w_s = R.weight_quant_ref(w)
    out = GG.fp8_grouped_gemm(x_fp8, x_s, w_fp8, w_s, OFFSETS, out_dtype=torch.float32)
    ref = G.fp8_grouped_gemm_ref(x_fp8, x_s, w_fp8, w_s, OFFSETS, out_dtype=torch.float32)
    assert out.shape == (M, N)
    assert _rel_fro(out, ref) < 1e-5
    exact = _loop_mm(R.act_dequant_ref(x_fp8, x_s), R.weight_dequant_ref(w_fp8, w_s), OFFSETS)
    assert _rel_fro(ref, exact) < 1e-6


def test_grouped_dgrad_kernel_with_transposed_weight_view():
    x, w = _data(1)
    dy = x[:, :N].contiguous()
    dy_fp8, dy_s = R.act_quant_ref(dy)
    w_fp8, w_s = R.weight_quant_ref(w)  # (E, N, K); dgrad reads wᵀ (E, K, N) as a view
    out = GG.fp8_grouped_gemm(dy_fp8, dy_s, w_fp8.transpose(1, 2), w_s.transpose(1, 2), OFFSETS,
                              out_dtype=torch.float32)
    exact = _loop_mm(R.act_dequant_ref(dy_fp8, dy_s), R.weight_dequant_ref(w_fp8, w_s).transpose(1, 2), OFFSETS)
    assert out.shape == (M, K)
    assert _rel_fro(out, exact) < 1e-5


def test_grouped_wgrad_kernel_matches_reference():
    x, w = _data(2)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    dy_t, dy_t_s = R.act_quant_t_ref(dy, OFFSETS)
    x_t, x_t_s = R.act_quant_t_ref(x, OFFSETS)
    dw = GG.fp8_grouped_wgrad(dy_t, dy_t_s, x_t, x_t_s, OFFSETS)
    ref = G.fp8_grouped_wgrad_ref(dy_t, dy_t_s, x_t, x_t_s, OFFSETS)
    assert dw.shape == (len(OFFSETS), N, K) and dw.dtype == torch.float32
    assert _rel_fro(dw, ref) < 1e-5
    assert torch.all(dw[0] == 0) and torch.all(dw[2] == 0)  # experts without tokens
    # against the FP64 per-expert dyᵀx of the dequantised operands
    dyd, xd = R.act_dequant_t_ref(dy_t, dy_t_s, OFFSETS), R.act_dequant_t_ref(x_t, x_t_s, OFFSETS)
    for g, (s, e) in [(1, (0, 3)), (3, (3, 150)), (5, (151, 290))]:
        assert _rel_fro(dw[g], dyd[:, s:e].double() @ xd[:, s:e].double().t()) < 1e-5


def test_token_tiles_do_not_straddle_experts_in_wgrad():
    """Blowing up expert 4's single token must not change any other expert's quantised wgrad."""
    x, _ = _data(4)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(5))
    dw = {}
    for name, factor in (("base", 1.0), ("spike", 1e4)):
        xs, dys = x.clone(), dy.clone()
        xs[150] *= factor
        dys[150] *= factor
        dw[name] = GG.fp8_grouped_wgrad(*R.act_quant_t_ref(dys, OFFSETS), *R.act_quant_t_ref(xs, OFFSETS), OFFSETS)
    for g in (1, 3, 5):
        assert torch.equal(dw["base"][g], dw["spike"][g])
    assert not torch.equal(dw["base"][4], dw["spike"][4])
    # a 1×128 tiling along M that ignored the experts would mix row 150 into rows 128..255
    x_t_plain, s_plain = R.act_quant_t_ref(x * (torch.arange(M) == 150)[:, None] * 1e4 + x, None)
    x_t_group, s_group = R.act_quant_t_ref(x * (torch.arange(M) == 150)[:, None] * 1e4 + x, OFFSETS)
    assert not torch.equal(R.act_dequant_t_ref(x_t_plain, s_plain)[:, 128:150],
                           R.act_dequant_t_ref(x_t_group, s_group, OFFSETS)[:, 128:150])


def test_fp8_grouped_mm_autograd_triton_vs_torch_and_vs_fp64():
    x, w = _data(6)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(7))
    results = {}
    triton_kernels.reset_counters()
    for backend in ("torch", "triton"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = GM.fp8_grouped_mm(xx, ww, OFFSETS, backend=backend)
        y.backward(dy)
        results[backend] = (y, xx.grad, ww.grad)
    assert dict(triton_kernels.counters) == {f"fp8_grouped_mm.{op}": 2 for op in ("fprop", "dgrad", "wgrad")}
    for got, ref in zip(results["triton"], results["torch"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert _rel_fro(got, ref) < 1e-5
    # the FP8 result against the unquantised FP64 truth: E4M3 noise, a few percent at most
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ends = OFFSETS.tolist()
    y64 = torch.cat([xd[s:e] @ wd[g].t() for g, (s, e) in enumerate(zip([0] + ends[:-1], ends))])
    y64.backward(dy.double())
    for got, ref in zip(results["torch"], (y64, xd.grad, wd.grad)):
        assert 1e-3 < _rel_fro(got, ref) < 0.06


def test_fp8_grouped_mm_dtypes_and_pow2_scales():
    x, w = _data(8)
    xx, ww = x.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_()
    y = GM.fp8_grouped_mm(xx, ww, OFFSETS, backend="torch", pow2_scale=True)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xx.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.float32
    assert _rel_fro(y.float(), _loop_mm(xx.detach().float(), w, OFFSETS)) < 0.06
    with pytest.raises(ValueError, match="offsets has 2 entries for 6 experts"):
        GM.fp8_grouped_mm(x, w, OFFSETS[:2])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pow2_flag_reaches_the_fprop_scales(backend, monkeypatch):
    """fp8_grouped_mm(pow2_scale=True) quantises its input with power-of-2 scales (report §3.3.3: the
    dispatched activations): the fprop's activation scales, recorded as the op makes them, have a zero
    mantissa field bit by bit, and the output equals the grouped GEMM of those FP8 operands; with the flag
    off the same scales are not powers of two."""
    import triton_kernels.high_precision as HP     # pass_ops takes each pass's ops from fp8_ops
    real = HP.fp8_ops
    seen = []

    def spying(b):
        ops = real(b)
        act_quant = ops.act_quant

        def record(x, *a, **kw):
            out = act_quant(x, *a, **kw)
            seen.append(out[1])
            return out
        ops.act_quant = record
        return ops
    monkeypatch.setattr(HP, "fp8_ops", spying)
    x, w = _data(9)
    x, w = x[:160, :128], w[:, :, :128]
    offsets = torch.tensor([0, 3, 3, 100, 101, 160], dtype=torch.int32)
    for pow2 in (True, False):
        seen.clear()
        y = GM.fp8_grouped_mm(x, w, offsets, backend=backend, pow2_scale=pow2)
        assert len(seen) == 1
        mant = seen[0].contiguous().view(torch.int32) & 0x7FFFFF
        assert bool((mant == 0).all()) == pow2, (pow2, mant)
        x_fp8, s = R.act_quant_ref(x, pow2_scale=pow2)
        assert torch.equal(s, seen[0])
        w_fp8, w_s = R.weight_quant_ref(w)
        ref = G.fp8_grouped_gemm_ref(x_fp8, s, w_fp8, w_s, offsets, out_dtype=torch.float32)
        # the same FP8 products summed in fp32 in another order: |Δ| ≤ 2·K·u·Σ|a||b| (u = 2⁻²⁴)
        a, b = R.act_dequant_ref(x_fp8, s).abs(), R.weight_dequant_ref(w_fp8, w_s).abs()
        ends = offsets.tolist()
        mag = torch.cat([a[s0:e] @ b[g].t() for g, (s0, e) in enumerate(zip([0] + ends[:-1], ends))])
        assert ((y - ref).abs() <= 2 * 128 * 2.0 ** -24 * mag).all()


def test_gate_up_and_swiglu_down_triton_vs_torch():
    """The routed experts' FP8 ops through the kernels and through the torch references, each given the
    same inputs and output gradient (so every quantisation sees the same numbers): gate and up as one GEMM
    over [w1; w3] (inter = N = 70, padded to 128 rows per weight), and the SwiGLU-input-cached down
    projection. Agreement up to FP32 summation order, as the test above."""
    from triton_kernels.fp8_swiglu import fp8_swiglu_down
    g = torch.Generator().manual_seed(9)
    E = OFFSETS.numel()
    x, dgu, dy = torch.randn(M, K, generator=g), torch.randn(M, 2 * N, generator=g), torch.randn(M, K, generator=g)
    w1, w3 = (torch.randn(E, N, K, generator=g) * 0.05 for _ in range(2))
    w2 = torch.randn(E, K, N, generator=g) * 0.05
    gu, rw = torch.randn(M, 2 * N, generator=g), torch.rand(M, generator=g)
    ops = {"gate_up": (lambda t, be: GM.fp8_gate_up(t[0], t[1], t[2], OFFSETS, backend=be), (x, w1, w3), dgu),
           "swiglu_down": (lambda t, be: fp8_swiglu_down(t[0], t[1], t[2], OFFSETS, backend=be), (gu, rw, w2), dy)}
    for name, (fn, inputs, grad) in ops.items():
        results = {}
        for backend in ("torch", "triton"):
            leaves = [t.clone().requires_grad_() for t in inputs]
            y = fn(leaves, backend)
            y.backward(grad)
            results[backend] = [y] + [t.grad for t in leaves]
        for i, (got, ref) in enumerate(zip(results["triton"], results["torch"])):
            assert got.shape == ref.shape and got.dtype == ref.dtype
            assert _rel_fro(got, ref) < 1e-5, (name, i, _rel_fro(got, ref))
