"""Each speed path of dsv3/model/fast/ against the plain formula in the model module whose hook it fills,
forward and backward, at odd shapes: bit for bit where both run the same kernels in the same order,
else within a bound derived from the rounding of the operations that differ (u = unit roundoff,
γ_n = n·u/(1 − n·u), tests/rounding.py). Last, the whole model with every hook on its plain formula
against the default hooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from dsv3.model import fast
from dsv3.model import attention as plain_attention
from dsv3.model import experts as E
from dsv3.model import layers, loss, rope
from dsv3.model.fast import attention_core, combine, head_loss, rmsnorm, shared_input, swiglu
from dsv3.model.fast import rope as fast_rope
from rounding import gamma

U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def _run(fn, inputs, dy, *rest):
    """fn(*inputs, *rest) and the gradients of (output · dy) w.r.t. the inputs."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*xs, *rest)
    y.backward(dy)
    return [y.detach()] + [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_fast_equals_formula(dtype):
    """Forward and dw: the same ops in the same order, bitwise. dx = rstd·(g − x̂·mean(g·x̂)) by hand against
    autograd's chain through the formula: both round a mean of d products and a few elementwise ops, so
    |Δ| ≤ 2·(γ_d + 4u)·rstd·(|g| + |x̂|·mean|g·x̂|), g = dy·w."""
    d, eps = 37, 1e-6
    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(s, generator=gen, dtype=dtype) for s in ((3, 7, d), (d,), (3, 7, d)))
    got = _run(rmsnorm.rms_norm, (x, w), dy, eps, dtype)
    ref = _run(layers.rms_norm, (x, w), dy, eps, dtype)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    xhat, g = x * rstd, dy * w
    bound = 2 * (gamma(d, dtype) + 4 * U[dtype]) * rstd * (g.abs() + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True))
    assert ((got[1] - ref[1]).abs() <= bound).all(), ((got[1] - ref[1]).abs() / bound).max()
    assert layers.RMSNorm(d).impl.name == "rms_norm" and fast.default_impls(x.device, dtype)["rms_norm"] is rmsnorm.rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rope_fast_equals_complex_rotation(dtype):
    """The same complex multiplication forward; backward by e^{−iθ} equals autograd's conj-multiplication:
    bitwise, on a strided slice (as MLA passes q_rope) with an odd number of positions."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 9, 3, 14, generator=gen, dtype=dtype)
    cos, sin = torch.randn(9, 5, generator=gen, dtype=dtype), torch.randn(9, 5, generator=gen, dtype=dtype)
    dy = torch.randn(2, 9, 3, 10, generator=gen, dtype=dtype)
    got = _run(fast_rope.rotate_pairs, (base[..., 4:],), dy, cos, sin)
    ref = _run(rope.apply_rope, (base[..., 4:],), dy, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def _attention_inputs(T, gen, B=2, H=3, dn=16, dr=8, dv=12):
    shapes = [(B, T, H, dn), (B, T, H, dr), (B, T, H, dn), (B, T, 1, dr), (B, T, H, dv)]
    return [torch.randn(*s, generator=gen) for s in shapes], torch.randn(B, T, H, dv, generator=gen)


@pytest.mark.parametrize("T", [attention_core.BLOCK * 2 + 21, attention_core.BLOCKED_MAX_T + 13])
def test_attention_core_fast_equals_softmax_formula(T):
    """The CPU cores in FP32 (query-blocked at T ≤ 256, flash kernels above) and the SDPA core against the
    plain softmax(q kᵀ·scale + mask) v evaluated in fp64: rounding only, |Δ| ≤ 64·u·(1 + |ref|) (the ≤ T-term
    dot products' accumulated rounding, √T·u·Σ|terms| with O(1) terms, and the softmax's), × H for the shared
    rope key's gradient, a sum over H heads. SDPA in fp64 against the formula in fp64 likewise with u = 2⁻⁵³."""
    gen = torch.Generator().manual_seed(2)
    xs, dy = _attention_inputs(T, gen, B=1 if T > 256 else 2)
    H = xs[0].shape[2]
    ref = _run(plain_attention.attention, [t.double() for t in xs], dy.double(), 0.3)
    cases = [(attention_core.cpu_attention, torch.float32), (attention_core.sdpa_attention, torch.float64)]
    for impl, dtype in cases:
        got = _run(impl, [t.to(dtype) for t in xs], dy.to(dtype), 0.3)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a.dtype == dtype
            bound = 64 * U[dtype] * (1 + b.abs()) * (H if i == 4 else 1)
            assert ((a.double() - b).abs() <= bound).all(), (impl.__name__, i, ((a.double() - b).abs() / bound).max())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fast.default_impls(cpu, torch.float32)["attention_core"] is attention_core.cpu_attention
    assert fast.default_impls(cpu, torch.bfloat16)["attention_core"] is attention_core.cpu_attention  # core in FP32
    assert fast.default_impls(cpu, torch.float64)["attention_core"] is attention_core.sdpa_attention
    assert fast.default_impls(cuda, torch.bfloat16)["attention_core"] is attention_core.sdpa_attention


def test_shared_input_group_runs_one_gemm_and_equals_its_slices():
    """Two Linears in one ``shared_input`` group (MLA's down-projections): the first call runs the whole
    group once through the common ``shared_impl`` and the second gets its slice; outputs and gradients
    bitwise those of the one packed GEMM; nothing is held once both are taken. Without a packing hook on CPU
    FP32 each Linear runs alone, bitwise the plain Linear."""
    gen = torch.Generator().manual_seed(3)
    a, b = layers.Linear(13, 5), layers.Linear(13, 7)
    with torch.no_grad():
        a.weight.normal_(generator=gen), b.weight.normal_(generator=gen)
    x, dys = torch.randn(2, 3, 13, generator=gen), [torch.randn(2, 3, n, generator=gen) for n in (5, 7)]
    calls = []

    def packing(x, ws):
        calls.append(len(ws))
        return F.linear(x, torch.cat(ws))
    results = {}
    for grouped in (True, False):
        for lin in (a, b):
            lin.weight.grad, lin.shared_impl, lin.shared_input = None, packing, None
        xx = x.clone().requires_grad_()
        if grouped:
            shared_input.share_input(a, b)
            ys = [a(xx), b(xx)]
            assert not a.shared_input._pending
        else:
            ys = list(packing(xx, [a.weight, b.weight]).split([5, 7], -1))
        torch.autograd.backward(ys, dys)
        results[grouped] = [*ys, xx.grad, a.weight.grad, b.weight.grad]
    assert calls == [2, 2]
    assert all(torch.equal(p, q) for p, q in zip(results[True], results[False]))
    for lin in (a, b):
        lin.shared_impl = None
    shared_input.share_input(a, b)
    with torch.no_grad():
        assert torch.equal(b(x), F.linear(x, b.weight)) and not a.shared_input._pending


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mlp_swiglu_fast_equals_formula_on_the_same_gemm(dtype, recompute):
    """The MLP's fast SwiGLU (w1, w3 as one GEMM, the packed backward) against the plain silu(w1 x) · w3 x with
    w1 x and w3 x taken from the same packed GEMM: silu·u and torch's silu_backward on both sides, bitwise —
    output, dx, dw1, dw3 (the GEMM's packing is checked against separate GEMMs in tests/test_layers.py)."""
    gen = torch.Generator().manual_seed(4)
    w1, w3 = layers.Linear(13, 11).to(dtype), layers.Linear(13, 11).to(dtype)
    with torch.no_grad():
        w1.weight.normal_(generator=gen), w3.weight.normal_(generator=gen)
    hook = lambda x, ws: F.linear(x, torch.cat(ws))                          # noqa: E731
    w1.shared_impl = w3.shared_impl = hook
    x, dy = torch.randn(2, 5, 13, generator=gen, dtype=dtype), torch.randn(2, 5, 11, generator=gen, dtype=dtype)
    results = []
    for impl in (swiglu.mlp_swiglu, None):
        w1.weight.grad = w3.weight.grad = None
        xx = x.clone().requires_grad_()
        if impl is None:
            gate, up = hook(xx, [w1.weight, w3.weight]).chunk(2, dim=-1)
            one = lambda t, w: {id(w1.weight): gate, id(w3.weight): up}[id(w)]          # noqa: E731
            w1.impl = w3.impl = one
            y = layers.swiglu(xx, w1, w3, recompute)
            w1.impl = w3.impl = F.linear
        else:
            y = impl(xx, w1, w3, recompute)
        y.backward(dy)
        results.append([y.detach(), xx.grad, w1.weight.grad, w3.weight.grad])
    assert all(torch.equal(p, q) for p, q in zip(*results))
    assert swiglu.mlp_swiglu(x, layers.Linear(13, 11), layers.Linear(13, 11)) is None   # CPU, no autocast: plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_experts_swiglu_fast_equals_formula(dtype):
    """The experts' packed SwiGLU h = silu(g)·u·w (rounded in that order) against the model's
    silu(g)·(u·w) on the same [gate | up] from one grouped GEMM: each side rounds the two products in its own
    order, |Δh| ≤ 4u·|silu(g)·u·w|; dgate, dup and dw likewise per product, dw a sum over the I columns
    (2γ_I). Through the module (fp64 on CPU takes the packed path) the GEMM on [w1; w3] replaces two GEMMs."""
    gen = torch.Generator().manual_seed(5)
    M, K, inter, n_exp = 23, 16, 9, 4
    experts = E.GroupedExperts(n_exp, K, inter, "segments").to(dtype)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(generator=gen)
    x, rw = torch.randn(M, K, generator=gen, dtype=dtype), torch.rand(M, generator=gen, dtype=dtype)
    offsets = torch.tensor([5, 5, 17, 23], dtype=torch.int32)
    gu = experts.gmm(x, torch.cat([experts.w1, experts.w3], dim=1), offsets).detach()
    dh = torch.randn(M, inter, generator=gen, dtype=dtype)
    got = _run(swiglu.swiglu_packed, (gu, rw), dh)
    experts.gate_up = lambda x, w1, w3, offsets: x                           # the same [gate | up], handed in
    ref = _run(lambda t, w: E.experts_swiglu(t, offsets, w, experts), (gu, rw), dh)
    experts.gate_up = None
    g, u = gu.chunk(2, dim=-1)
    a, uw = F.silu(g), u * rw[:, None]
    mags = [(a * uw).abs(), torch.cat([1.1 * (dh * uw).abs(), (dh * a * rw[:, None]).abs()], -1),
            2 * gamma(inter, dtype) * (dh * a * u).abs().sum(-1)]
    for p, q, m in zip(got, ref, mags):
        assert ((p - q).abs() <= 4 * U[dtype] * m + (m if m.dim() == 1 else 0)).all()
    assert fast.default_impls(x.device, torch.float32)["experts_swiglu"] is None       # FP32 on CPU: plain
    assert fast.default_impls(x.device, torch.bfloat16)["experts_swiglu"] is swiglu.experts_swiglu
    if dtype == torch.float64:
        assert experts.swiglu(x, offsets, rw, experts) is not None
        assert swiglu.experts_swiglu(x, offsets, rw, experts) is not None


def test_sum_rows_fast_equals_index_add():
    """The combine keeping only the index: index_add forward and index_select backward, bitwise autograd's."""
    gen = torch.Generator().manual_seed(6)
    rows, dy = torch.randn(17, 6, generator=gen), torch.randn(5, 6, generator=gen)
    index = torch.randint(0, 5, (17,), generator=gen)
    got, ref = _run(combine.sum_rows, (rows,), dy, index, 5), _run(E.sum_rows_plain, (rows,), dy, index, 5)
    assert all(torch.equal(p, q) for p, q in zip(got, ref))


def test_head_loss_fast_equals_cross_entropy(monkeypatch):
    """The fused, chunked head + cross-entropy (3 chunks, the last partial, ignored targets) against the
    plain head then F.cross_entropy, in fp64: the same sums of N·V exponentials in other orders and chunks,
    |Δloss| ≤ 2γ_{N+V}·Σ|log p|, and per dh, dW element 2γ_{V}, 2γ_{N} of their absolute sums (≤ 1e-12 here);
    declines (None) without a gradient, and the model then runs the plain formula."""
    monkeypatch.setattr(head_loss, "LOGIT_CHUNK_ELEMENTS", 128 * 71)
    gen = torch.Generator().manual_seed(7)
    N, D, V = 301, 24, 71
    head = layers.Linear(D, V).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.3)
    h, t = torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randint(0, V, (N,), generator=gen)
    t[::7] = -100
    results = []
    for fn in (head_loss.head_cross_entropy, loss.head_cross_entropy):
        hh = h.clone().requires_grad_()
        head.weight.grad = None
        out = fn(head, hh, t)
        out.backward()
        results.append([out.detach(), hh.grad, head.weight.grad])
    logp = torch.log_softmax(h @ head.weight.detach().t(), -1)
    p = logp.exp()
    bounds = [2 * gamma(N + V, torch.float64) * logp.abs().sum(),
              2 * gamma(V, torch.float64) * (p.abs() + 1) @ head.weight.detach().abs(),
              2 * gamma(N, torch.float64) * (p.abs() + 1).t() @ h.abs()]
    for a, b, bound in zip(*results, bounds):
        assert ((a - b).abs() <= bound).all()
    with torch.no_grad():
        assert head_loss.head_cross_entropy(head, h, t) is None


def _plain_(model: torch.nn.Module) -> None:
    """Every hook of ``model`` on its plain formula."""
    for m in model.modules():
        if isinstance(m, layers.RMSNorm):
            m.impl = layers.rms_norm
        elif isinstance(m, layers.Linear):
            m.shared_input = None
        elif isinstance(m, layers.MLP):
            m.swiglu = layers.swiglu
        elif isinstance(m, E.GroupedExperts):
            m.swiglu, m.gmm = E.experts_swiglu, E.grouped_mm_loop
        elif hasattr(m, "attention_core"):
            m.rotate, m.attention_core = rope.apply_rope, plain_attention.attention
    model.head.loss_impl = loss.head_cross_entropy


def test_model_with_plain_formulas_equals_fast_paths():
    """The whole model (tiny config, MTP on, odd T) with every hook on its plain formula against the default
    hooks, in fp64 and fp32: the loss and every gradient. Each path differs by rounding only (the tests
    above); through this 4-layer network they add up to at most a few hundred ulps of the largest element
    of each tensor (14 measured): ‖Δ‖∞ ≤ 2⁹·u·‖ref‖∞ (fp32: u = 2⁻²⁴, fp64: 2⁻⁵³)."""
    from dsv3.model.transformer import Transformer
    cfg = tiny_cfg().model
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (2, 19))
        results = []
        for plain in (False, True):
            torch.manual_seed(0)
            model = Transformer(cfg).to(dtype)
            if plain:
                _plain_(model)
            out = model(ids[:, :-1], labels=ids[:, 1:])
            out.loss.backward()
            results.append([out.loss.detach().reshape(1)] + [p.grad for p in model.parameters() if p.grad is not None])
        assert len(results[0]) == len(results[1]) > 10
        for a, b in zip(*results):
            assert (a - b).abs().max() <= 2 ** 9 * U[dtype] * b.abs().max(), ((a - b).abs().max() / b.abs().max())
