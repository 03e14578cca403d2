"""The grouped-GEMM MoE against per-expert references, forward and backward, with empty experts;
and the whole MoE layer against transformers' DeepseekV3MoE on the same weights."""
from __future__ import annotations

import pytest
import torch

from dsv3.config import MoEConfig
from dsv3.experts import GROUPED_MM_IMPLS, GroupedExperts, grouped_mm_loop, local_dispatch
from dsv3.moe import MoE

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


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
    E, D, I, N, k = 8, 16, 24, 37, 3
    empty = {0, 5, 7}                                      # first, middle and last expert get no token
    idx, w = routing(N, E, k, empty)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    ex = make_experts(E, D, I, impl, dtype)
    ref_ex = make_experts(E, D, I, "loop", dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    y = local_dispatch(x, idx, w.to(dtype), ex)
    y_ref = per_expert_reference(x_ref, idx, w.to(dtype), ref_ex)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    for a, b in ((ex.w1, ref_ex.w1), (ex.w2, ref_ex.w2), (ex.w3, ref_ex.w3)):
        torch.testing.assert_close(a.grad, b.grad, **TOL[dtype])
        assert a.grad[sorted(empty)].abs().max() == 0       # empty experts get exactly zero gradient


def test_grouped_mm_equals_loop_on_raw_offsets():
    """The gmm hook contract: rows of group g times w[g].T, empty groups anywhere."""
    x = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(5, 16, 32, requires_grad=True)
    offsets = torch.tensor([0, 6, 6, 20, 20], dtype=torch.int32)
    outs = {}
    for name, fn in GROUPED_MM_IMPLS.items():
        xi, wi = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
        y = fn(xi, wi, offsets)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        outs[name] = (y.detach(), xi.grad, wi.grad)
    ref = outs["loop"]
    manual = torch.cat([x[:6] @ w[1].t(), x[6:20] @ w[3].t()]).detach()
    torch.testing.assert_close(ref[0], manual, rtol=1e-6, atol=1e-6)
    for name in ("grouped_mm", "segments", "auto"):
        for a, b in zip(outs[name], ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segments_bf16_bucketed_rows_equal_fp32_loop():
    """BF16 on CPU takes the bucketed (zero-padded) row layout: same rows, dx and dw as the FP32 loop
    on the BF16-rounded operands, to BF16 output rounding; empty experts get exactly zero dw."""
    from dsv3.experts import _bucket_rows, grouped_mm_segments
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


def test_moe_layer_equals_transformers_deepseek_v3_moe():
    """Our MoE layer (gate + grouped experts + shared expert) vs transformers' DeepseekV3MoE with both of
    its experts backends, forward and backward, on the same weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    D, E, I = 32, 16, 24
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=1, moe_inter_dim=I, n_activated_experts=4, n_group=4,
                    topk_group=2, routed_scaling_factor=2.5, aux_loss_alpha=0.0)
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
        ours.zero_grad()
        y, y_ref = ours(xa), ref(xb)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.gate.weight.grad, ref.gate.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([ours.experts.w1.grad, ours.experts.w3.grad], 1),
                                   ref.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.experts.w2.grad, ref.experts.down_proj.grad, rtol=1e-5, atol=1e-5)


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
    from dsv3.moe import MoE
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
    from dsv3.experts import grouped_mm_auto
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
