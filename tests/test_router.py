"""The router (dsv3.model.moe.Gate) against a plain per-token loop written from report §2.1.2, and against
transformers' DeepseekV3TopkRouter on the same weights."""
from __future__ import annotations

import math

import pytest
import torch

from dsv3.config import MoEConfig
from dsv3.model.moe import Gate


def route_one_token(logits: list[float], bias: list[float], c: MoEConfig):
    """Report §2.1.2 (the gate of the released inference code), one token at a time, in plain Python
    floats. Ties go to the lower index."""
    E = len(logits)
    if c.scoring_func == "sigmoid":
        s = [1.0 / (1.0 + math.exp(-z)) for z in logits]
    else:
        m = max(logits)
        e = [math.exp(z - m) for z in logits]
        s = [v / sum(e) for v in e]
    biased = [s[i] + bias[i] for i in range(E)] if c.topk_method == "noaux_tc" else list(s)
    allowed = set(range(E))
    if c.n_group > 1 and c.topk_method != "greedy":
        per = E // c.n_group
        groups = [biased[g * per:(g + 1) * per] for g in range(c.n_group)]
        if c.topk_method == "noaux_tc":
            gscore = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:
            gscore = [max(g) for g in groups]
        kept = sorted(range(c.n_group), key=lambda g: (-gscore[g], g))[:c.topk_group]
        allowed = {g * per + j for g in kept for j in range(per)}
    chosen = sorted(allowed, key=lambda i: (-biased[i], i))[:c.n_activated_experts]
    w = [s[i] for i in chosen]
    if c.norm_topk_prob:
        total = sum(w)
        w = [v / total for v in w]
    return chosen, [v * c.routed_scaling_factor for v in w]


def check_against_loop(gate: Gate, x: torch.Tensor, route=route_one_token):
    """The gate on x against ``route`` (logits, bias, cfg) → (chosen, weights), token by token: the same
    experts, the weights within fp64 rounding. tests/test_router_registry.py passes its own ``route``."""
    weights, indices, _ = gate(x)
    logits = (x.double() @ gate.weight.double().t()).tolist()
    bias = gate.e_score_correction_bias.double().tolist()
    counts = [0] * gate.cfg.n_routed_experts
    for t in range(x.shape[0]):
        chosen, w = route(logits[t], bias, gate.cfg)
        assert indices[t].tolist() == chosen, f"token {t}"
        # fp64 gate vs Python floats: they differ by fp64 rounding (16-term logits, libm vs SLEEF exp),
        # ~1e-13 relative on any CPU, far inside this bound, which is there to catch a wrong weight
        assert torch.allclose(weights[t].double(), torch.tensor(w, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        for i in chosen:
            counts[i] += 1
    return counts


V3 = dict(n_routed_experts=32, n_activated_experts=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
          scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True)
V2_GROUPED = dict(n_routed_experts=32, n_activated_experts=6, n_group=4, topk_group=2, routed_scaling_factor=16.0,
                  scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False)
V2_LITE = dict(n_routed_experts=64, n_activated_experts=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
               scoring_func="softmax", topk_method="greedy", norm_topk_prob=False)


def make_gate(kw, dim=16, seed=0, bias_scale=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate = Gate(dim, MoEConfig(**kw))
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 0.5)
        gate.e_score_correction_bias.copy_(torch.randn(kw["n_routed_experts"], generator=g) * bias_scale)
    return gate.to(dtype)


@pytest.mark.parametrize("kw", [V3, V2_GROUPED, V2_LITE], ids=["v3_noaux_tc", "v2_group_limited", "v2_lite_greedy"])
def test_router_equals_per_token_loop(kw):
    gate = make_gate(kw, bias_scale=0.05 if kw["topk_method"] == "noaux_tc" else 0.0, dtype=torch.float64)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = check_against_loop(gate, x)
    assert sum(counts) == 200 * kw["n_activated_experts"]


@pytest.mark.parametrize("kw", [V3, V2_GROUPED, V2_LITE], ids=["v3_noaux_tc", "v2_group_limited", "v2_lite_greedy"])
def test_router_ties_go_to_lower_index(kw):
    """Identical gate rows make whole blocks of experts tie exactly (scores, group scores and top-k).
    The ties must be exact in the router's own logits on every CPU: a GEMM may sum a dot product in any
    order, with or without FMA, so random rows tie only up to the last bit (issue 15: an AVX2 EPYC broke
    them the other way). Here every weight is a multiple of 1/4 in [-3/4, 3/4] and every input a multiple
    of 1/2 in [-3/2, 3/2]: each product is a multiple of 1/8 of size ≤ 9/8 and every partial sum of 16 of
    them has |.| ≤ 18, so it needs ≤ 8 significant bits: exact in fp64 in any order (also in fp32), and
    the reference loop's own matmul gives the very same logits."""
    gate = make_gate(kw, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        rows = torch.randint(-3, 4, (4, 16), generator=g, dtype=torch.float64) / 4
        gate.weight.copy_(rows[torch.arange(kw["n_routed_experts"]) % 4])   # expert i ≡ expert i mod 4
    x = torch.randint(-3, 4, (64, 16), generator=g, dtype=torch.float64) / 2
    _, idx, scores = gate(x)
    # the precondition, checked on the scores the router itself ranked: tied columns are bitwise equal
    classes = torch.arange(kw["n_routed_experts"]) % 4
    assert torch.equal(scores, scores[:, classes])
    check_against_loop(gate, x)
    # all groups tie, so groups 0 and 1 (experts < 16) are kept; greedy: the 6 lowest of a class of 16 (< 24)
    assert idx.max().item() < (24 if kw["topk_method"] == "greedy" else 16)


def test_router_experts_with_zero_tokens():
    """A bias that pushes half the experts down: they get no token, in the gate and in the loop."""
    gate = make_gate(V3, dtype=torch.float64)
    with torch.no_grad():
        gate.e_score_correction_bias[16:] = -2.0
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    counts = check_against_loop(gate, x)
    assert counts[16:] == [0] * 16 and sum(counts) == 400
    _, idx, _ = gate(x)
    assert torch.bincount(idx.flatten(), minlength=32).tolist() == counts


def test_router_fp32_gate_on_bf16_input():
    """Scores are computed in FP32 even for BF16 activations (report §3.3: the gate stays high precision)."""
    gate = make_gate(V3, bias_scale=0.05)
    x = torch.randn(50, 16).bfloat16()
    w, idx, s = gate(x)
    assert w.dtype == torch.float32 and s.dtype == torch.float32
    w32, idx32, _ = gate(x.float())
    assert torch.equal(idx, idx32) and torch.equal(w, w32)


def test_router_equals_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter
    dim = 16
    hf_cfg = DeepseekV3Config(hidden_size=dim, n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=8,
                              n_shared_experts=1)
    for seed in range(3):
        ours = make_gate(V3, dim=dim, seed=seed, bias_scale=0.05)
        ref = DeepseekV3TopkRouter(hf_cfg)
        with torch.no_grad():
            ours.e_score_correction_bias.abs_()
            ref.weight.copy_(ours.weight)
            ref.e_score_correction_bias.copy_(ours.e_score_correction_bias)
        x = torch.randn(300, dim, generator=torch.Generator().manual_seed(10 + seed))
        w, idx, s = ours(x)
        assert ((s + ours.e_score_correction_bias) > 0).all()          # the precondition of the comparison
        logits_ref, w_ref, idx_ref = ref(x)
        torch.testing.assert_close(s, logits_ref.sigmoid(), rtol=0, atol=0)
        # transformers returns the top-k unsorted: compare as sets ordered by expert index
        o, o_ref = idx.sort(dim=-1), idx_ref.sort(dim=-1)
        assert torch.equal(o.values, o_ref.values)
        # the same FP32 ops but the 4 chosen scores summed in another order (transformers' top-k is unsorted):
        # each sum within γ_3 ≈ 3u of exact (positive terms), then a division and a scaling rounded once
        # each, so the two differ by ≤ 2·(3 + 1 + 1)·u relative to first order, u = 2⁻²⁴; 11u covers the u² terms
        # (measured ≤ 3.5u)
        torch.testing.assert_close(w.gather(1, o.indices), w_ref.gather(1, o_ref.indices), rtol=11 * 2.0 ** -24, atol=0)
    # DeepseekV3MoE uses the same gate module: its `gate` attribute is a DeepseekV3TopkRouter
    assert isinstance(DeepseekV3MoE(hf_cfg).gate, DeepseekV3TopkRouter)
