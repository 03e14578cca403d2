"""The grouped-GEMM MoE against per-expert references, forward and backward, with empty experts;
and the whole MoE layer against transformers' DeepseekV3MoE on the same weights."""
from __future__ import annotations

import pytest
import torch

from dsv3.config import MoEConfig
from dsv3.model.experts import GROUPED_MM_IMPLS, GroupedExperts, grouped_mm_loop, local_dispatch
from dsv3.model.moe import MoE
from tests.rounding import (C_SILU, gamma, routed_abs_sums, swiglu_abs_sums, swiglu_chain, unit_roundoff,
                            worst)


def per_expert_reference(x, topk_idx, topk_weight, experts: GroupedExperts):
    """Plain loop: every token, every chosen expert, its own SwiGLU — no sorting, no grouped GEMM."""
    y = torch.zeros_like(x)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[t, j])
            h = torch.nn.functional.silu(experts.w1[e] @ x[t]) * (experts.w3[e] @ x[t])
            acc = acc + topk_weight[t, j] * (experts.w2[e] @ h)
        rows.append(acc)
    return torch.stack(rows) if rows else y


def make_experts(n_experts, dim, inter, impl, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = GroupedExperts(n_experts, dim, inter, impl).to(dtype)
    with torch.no_grad():
        for w in (ex.w1, ex.w2, ex.w3):
            w.copy_(torch.randn(w.shape, generator=g, dtype=dtype) * 0.2)
    return ex


def routing(n_tokens, n_experts, k, empty: set[int], seed=1):
    """Random top-k without repeats, never choosing the experts in `empty`."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(n_experts) if e not in empty])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(n_tokens)])
    return idx, torch.rand(n_tokens, k, generator=g)


# torch._grouped_mm has no fp64 kernel: in fp64 'auto' falls back to the loop
@pytest.mark.parametrize("impl,dtype", [("loop", torch.float32), ("grouped_mm", torch.float32), ("auto", torch.float32),
                                        ("loop", torch.float64), ("auto", torch.float64)])
def test_grouped_experts_equal_per_token_loop_fwd_bwd(impl, dtype):
    """Every element within the rounding bound of two computations of the same rows (tests/rounding.py):
    2·γ_n times the absolute sums of each row's SwiGLU chain, n = its roundings (swiglu_chain) plus the k
    rows summed into a token (output, input gradient) or the ≤ N rows summed into an expert's weight
    gradient. (Realised: ≤ 3e-3 of the bound in fp32 and fp64; a 1e-3 relative error exceeds it 4–40×.)"""
    E, D, I, N, k = 8, 16, 24, 37, 3
    torch.manual_seed(0)
    empty = {0, 5, 7}                                      # first, middle and last expert get no token
    idx, w = routing(N, E, k, empty)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    ex = make_experts(E, D, I, impl, dtype)
    ref_ex = make_experts(E, D, I, "loop", dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    y = local_dispatch(x, idx, w.to(dtype), ex)
    y_ref = per_expert_reference(x_ref, idx, w.to(dtype), ref_ex)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tok, r = routed_abs_sums(ref_ex, x, idx, w, g)
    per_token = lambda t: torch.zeros(N, D, dtype=torch.float64).index_add(0, tok, t)  # noqa: E731
    chain = swiglu_chain(D, I)
    bounds = {"y": 2 * gamma(chain + k, dtype) * per_token(r["y"]),
              "x": 2 * gamma(chain + k, dtype) * per_token(r["x"])}
    for name in ("w1", "w2", "w3"):
        bounds[name] = 2 * gamma(chain + N, dtype) * torch.zeros((E,) + r[name].shape[1:], dtype=torch.float64
                                                                 ).index_add(0, idx.reshape(-1), r[name])
    ratios = {"y": worst(y, y_ref, bounds["y"]), "x": worst(x.grad, x_ref.grad, bounds["x"])}
    for name in ("w1", "w2", "w3"):
        a, b = getattr(ex, name).grad, getattr(ref_ex, name).grad
        ratios[name] = worst(a, b, bounds[name])
        assert a[sorted(empty)].abs().max() == 0            # empty experts get exactly zero gradient
    assert max(ratios.values()) <= 1.0, {n: f"{v:.3g} × its bound" for n, v in ratios.items()}


def test_grouped_mm_equals_loop_on_raw_offsets():
    """The gmm hook contract: rows of group g times w[g].T, empty groups anywhere. Each implementation
    within the rounding bound of the loop, 2·γ_n times the absolute sums (tests/rounding.py): y sums the
    32 input features, dx the 16 outputs, dw a group's ≤ 14 rows."""
    torch.manual_seed(0)
    x = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(5, 16, 32, requires_grad=True)
    offsets = torch.tensor([0, 6, 6, 20, 20], dtype=torch.int32)
    dy = torch.arange(20 * 16).view(20, 16).sin()
    outs = {}
    for name, fn in GROUPED_MM_IMPLS.items():
        xi, wi = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        y = fn(xi, wi, offsets)
        (y * dy).sum().backward()
        outs[name] = (y.detach(), xi.grad, wi.grad)
    group = torch.tensor([1] * 6 + [3] * 14)                # each row's group
    xa, wa, dya = x.detach().double().abs(), w.detach().double()[group].abs(), dy.double().abs()
    bounds = (2 * gamma(32, torch.float32) * torch.einsum("rd,rod->ro", xa, wa),
              2 * gamma(16, torch.float32) * torch.einsum("ro,rod->rd", dya, wa),
              2 * gamma(14, torch.float32) * torch.zeros(5, 16, 32, dtype=torch.float64).index_add(
                  0, group, dya[:, :, None] * xa[:, None, :]))
    ref = outs["loop"]
    manual = torch.cat([x[:6] @ w[1].t(), x[6:20] @ w[3].t()]).detach()
    assert worst(ref[0], manual, bounds[0]) <= 1.0
    for name in ("grouped_mm", "segments", "auto"):
        for what, a, b, bound in zip(("y", "dx", "dw"), outs[name], ref, bounds):
            assert worst(a, b, bound) <= 1.0, (name, what, f"{worst(a, b, bound):.3g} × its bound")


def test_segments_bf16_bucketed_rows_equal_fp32_loop():
    """BF16 on CPU takes the bucketed (zero-padded) row layout: same rows, dx and dw as the FP32 loop
    on the BF16-rounded operands, to BF16 output rounding; empty experts get exactly zero dw."""
    from dsv3.model.experts import _bucket_rows, grouped_mm_segments
    assert [_bucket_rows(m) for m in (0, 1, 32, 33, 100, 513, 1000)] == [0, 32, 32, 64, 128, 576, 1024]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(150, 64, generator=g).bfloat16()
    w = torch.randn(6, 48, 64, generator=g).bfloat16()
    offsets = torch.tensor([37, 37, 100, 101, 150, 150], dtype=torch.int32)
    dy = torch.randn(150, 48, generator=g)
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = grouped_mm_segments(xb, wb, offsets)
    y.float().backward(dy)
    xr, wr = x.float().requires_grad_(True), w.float().requires_grad_(True)
    yr = grouped_mm_loop(xr, wr, offsets)
    yr.backward(dy.bfloat16().float())
    assert y.dtype == xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    for a, b in ((y, yr), (xb.grad, xr.grad), (wb.grad, wr.grad)):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=2e-2)
    assert wb.grad[1].abs().max() == 0 and wb.grad[5].abs().max() == 0


def _hf_bounds(moe: MoE, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Bounds on |ours − transformers'| for every element of the MoE layer's output and gradients under
    ∂L/∂y = g, x (N, D): twice what either fp32 computation can be from exact (tests/rounding.py). With the
    same experts chosen, both compute y = Σ_j w_j·E_j(x) + S(x), w_j = r·s_j/S, S = Σ_chosen s, s = σ(z),
    z = W_g x, each in its own order. Per computation, to first order (u = 2⁻²⁴):
    - SwiGLU rows, routed and shared: γ_(chain + K + 3) times their absolute sums (+ K + 3: the token's
      k rows, the shared row, and the gate path summed into y and ∂x);
    - gate weights: z within γ_D·Z (Z = |W_g||x|), so s within s·ρ_s, ρ_s = γ_D·Z + C_SILU·u (σ' = s(1 − s)
      ≤ s; sigmoid is silu less a multiply); S within ρ_S = max_chosen ρ_s + γ_(K+1) (+ 1e-20); w within
      ρ_w = ρ_s + ρ_S + 2u, which scales a routed row's sums;
    - the gate's gradient ∂L/∂z_i = σ'_i·r·(v_i − Σ_j s_j v_j/S)/S (v_j = ∂L/∂w_j, |v_j| ≤ V_j = |g|·|W2|H,
      swiglu_abs_sums' "w"): at most M_i = σ'_i·r·(V_i + Σ_j s_j V_j/S)/S, within M_i·(γ_(chain + K + 8)
      [v's chain, the backward's products and K-term sum] + max ρ_s + 2ρ_S [s, S reused] + ρ_s,i +
      C_SILU·u/(1 − s_i) [σ' from the rounded s]); into ∂x through |W_g|ᵀ (E terms), into ∂W_g as ⊗|x|
      over N tokens."""
    c = moe.cfg
    assert c.scoring_func == "sigmoid" and c.norm_topk_prob and c.aux_loss_alpha == 0 and c.n_shared_experts == 1
    N, D = x.shape
    E, K, f32, u = c.n_routed_experts, c.n_activated_experts, torch.float32, unit_roundoff(torch.float32)
    chain = swiglu_chain(D, c.moe_inter_dim)
    with torch.no_grad():
        w, idx, scores = moe.gate(x)
    tok, r = routed_abs_sums(moe.experts, x, idx, w, g)
    sh = moe.shared_experts
    sa = swiglu_abs_sums(x.double(), *(m.weight.detach().double().expand(N, -1, -1) for m in (sh.w1, sh.w2, sh.w3)),
                         torch.ones(N, dtype=torch.float64), g.double())
    xa, wg = x.detach().double().abs(), moe.gate.weight.detach().double().abs()
    rho_s = (gamma(D, f32) * (xa @ wg.t()) + C_SILU * u).gather(1, idx)         # chosen experts: (N, K)
    rho_S = rho_s.amax(-1, keepdim=True) + gamma(K + 1, f32)
    rho_w = (rho_s + rho_S + 2 * u).reshape(-1, 1)                               # per routed row
    per_token = lambda t: torch.zeros(N, D, dtype=torch.float64).index_add(0, tok, t)  # noqa: E731
    rows_g = gamma(chain + K + 3, f32)
    sc = scores.detach().double().gather(1, idx)
    S, V = sc.sum(-1, keepdim=True), r["w"].view(N, K)
    M_c = sc * (1 - sc) * c.routed_scaling_factor * (V + (sc * V).sum(-1, keepdim=True) / S) / S
    eps_c = M_c * (gamma(chain + K + 8, f32) + rho_s.amax(-1, keepdim=True) + 2 * rho_S + rho_s
                   + C_SILU * u / (1 - sc).clamp_min(u))
    M, eps = (torch.zeros(N, E, dtype=torch.float64).scatter(1, idx, t) for t in (M_c, eps_c))
    out = {"y": rows_g * (per_token(r["y"]) + sa["y"]) + per_token(rho_w * r["y"]),
           "x": rows_g * (per_token(r["x"]) + sa["x"]) + per_token(rho_w * r["x"])
           + eps @ wg + gamma(E + K + 3, f32) * (M @ wg),
           "gate": eps.t() @ xa + gamma(N, f32) * (M.t() @ xa)}
    for name in ("w1", "w2", "w3"):
        out[name] = torch.zeros((E,) + r[name].shape[1:], dtype=torch.float64).index_add(
            0, idx.reshape(-1), (gamma(chain + N, f32) + rho_w[:, :, None]) * r[name])
        out[f"shared.{name}"] = gamma(chain + N, f32) * sa[name].sum(0)
    return {k: 2 * v for k, v in out.items()}


def test_moe_layer_equals_transformers_deepseek_v3_moe():
    """Our MoE layer (gate + grouped experts + shared expert) vs transformers' DeepseekV3MoE with both of
    its experts backends, forward and backward, on the same weights: the same experts chosen, every element
    within the rounding bound of _hf_bounds. Transformers' router computes in fp32 whatever the model's
    dtype, so this comparison stays in fp32. (Realised: ≤ 2e-3 of the bound; a 1e-3 relative error in the
    output, or in the gate weights alone, exceeds it 4×.)"""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    D, E, I = 32, 16, 24
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=1, moe_inter_dim=I, n_activated_experts=4, n_group=4,
                    topk_group=2, routed_scaling_factor=2.5, aux_loss_alpha=0.0)
    torch.manual_seed(0)
    ours = MoE(D, cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        ours.gate.e_score_correction_bias.uniform_(0, 0.05)
    for backend in ("eager", "grouped_mm"):
        hf_cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4, n_group=4, topk_group=2,
                                  routed_scaling_factor=2.5, moe_intermediate_size=I, n_shared_experts=1,
                                  experts_implementation=backend)
        ref = DeepseekV3MoE(hf_cfg)
        with torch.no_grad():
            ref.gate.weight.copy_(ours.gate.weight)
            ref.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
            ref.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
            ref.experts.down_proj.copy_(ours.experts.w2)
            ref.shared_experts.gate_proj.weight.copy_(ours.shared_experts.w1.weight)
            ref.shared_experts.up_proj.weight.copy_(ours.shared_experts.w3.weight)
            ref.shared_experts.down_proj.weight.copy_(ours.shared_experts.w2.weight)
        x = torch.randn(3, 11, D, generator=torch.Generator().manual_seed(5))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        # the same experts: on these inputs the chosen and the next scores (and group scores) differ by
        # ≥ 1.8e-3, 45× what rounding can move them (s·ρ_s ≤ 1.9e-5 in _hf_bounds, twice, and twice again for
        # group scores), so no CPU's kernels can route them differently
        with torch.no_grad():
            chosen, hf_chosen = ours.gate(x.view(-1, D))[1], ref.gate(x)[2]
        assert torch.equal(chosen.sort(-1).values, hf_chosen.sort(-1).values)
        ours.zero_grad()
        y, y_ref = ours(xa), ref(xb)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        bound = _hf_bounds(ours, x.view(-1, D), g.view(-1, D))
        up = ref.experts.gate_up_proj.grad
        pairs = {"y": (y, y_ref), "x": (xa.grad, xb.grad), "gate": (ours.gate.weight.grad, ref.gate.weight.grad),
                 "w1": (ours.experts.w1.grad, up[:, :I]), "w3": (ours.experts.w3.grad, up[:, I:]),
                 "w2": (ours.experts.w2.grad, ref.experts.down_proj.grad)}
        for name, hf in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            pairs[f"shared.{name}"] = (getattr(ours.shared_experts, name).weight.grad,
                                       getattr(ref.shared_experts, hf).weight.grad)
        ratios = {name: worst(a.reshape(bound[name].shape), b.reshape(bound[name].shape), bound[name])
                  for name, (a, b) in pairs.items()}
        assert max(ratios.values()) <= 1.0, (backend, {n: f"{v:.3g} × its bound" for n, v in ratios.items()})


def test_dispatcher_hook_is_used():
    cfg = MoEConfig(n_routed_experts=8, n_activated_experts=2, n_group=1, topk_group=1, aux_loss_alpha=0.0)
    moe = MoE(16, cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    calls = []

    def spy(x, topk_idx, topk_weight, experts):
        calls.append((x.shape, topk_idx.shape, topk_weight.shape))
        return local_dispatch(x, topk_idx, topk_weight, experts)

    x = torch.randn(2, 5, 16)
    y0 = moe(x)
    moe.dispatcher = spy
    torch.testing.assert_close(moe(x), y0, rtol=0, atol=0)
    assert calls == [((10, 16), (10, 2), (10, 2))]


def test_moe_with_zero_tokens_gives_empty_output_and_zero_grads():
    """An expert-parallel rank may route no tokens: the layer must still run forward and backward."""
    import dsv3.config as C
    from dsv3.model.moe import MoE
    torch.manual_seed(0)
    cfg = C.MoEConfig(n_routed_experts=8, n_group=4, topk_group=2, n_activated_experts=2, moe_inter_dim=16)
    moe = MoE(32, cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.zeros(0, 5, 32, requires_grad=True)
    y = moe(x)
    y.sum().backward()
    assert y.shape == (0, 5, 32)
    assert moe.experts.w1.grad is None or moe.experts.w1.grad.abs().sum().item() == 0.0


def test_padded_bf16_dispatch_equals_unpadded():
    """Under BF16 autocast on CPU local_dispatch pads each expert's rows to its bucket (gate weight 0);
    the MoE output and every gradient equal the unpadded per-expert loop on the same BF16 operands.
    (The auto path also runs gate and up as one grouped GEMM on the concatenated weights.)"""
    from dsv3.model.experts import grouped_mm_auto
    torch.manual_seed(0)
    D, E = 64, 8
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=0, moe_inter_dim=32, n_activated_experts=2, n_group=1,
                    topk_group=1, aux_loss_alpha=0.0)
    moe = MoE(D, cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 50, D)
    results = {}
    for gmm in (grouped_mm_auto, grouped_mm_loop):
        moe.experts.gmm = gmm
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (moe.experts.row_bucket(xi.bfloat16()) is not None) == (gmm is grouped_mm_auto)
            y = moe(xi)
        y.float().pow(2).sum().backward()
        results[gmm.__name__] = [y.float(), xi.grad] + [p.grad.float() for p in moe.parameters()]
    # BF16 operands on both sides; the fused gate/up GEMM sums the input gradient in FP32 where the loop
    # adds two BF16 products: agreement to BF16 rounding (relative Frobenius norm)
    for a, b in zip(results["grouped_mm_auto"], results["grouped_mm_loop"]):
        assert (a - b).norm() <= 1e-2 * b.norm(), ((a - b).norm(), b.norm())
