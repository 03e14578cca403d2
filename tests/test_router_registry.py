"""A router variant registered from this module alone (issue 23): no other file names it, and the config,
the MoE layer, its bias update and the router parity check of tests/test_router.py all take it.

The variant (report §2.1.2 is the V3 router it departs from):
- scoring_func ``sqrt_softplus``: s = √softplus(z). Positive like V3's sigmoid (so s + b and the
  normalised gate weights keep their meaning) but unbounded, growing like √z: strong experts do not all
  saturate at 1 the way sigmoid scores do, and no single one swamps the rest the way softmax's exp does.
- topk_method ``noaux_group_max``: V3's aux-loss-free selection (rank s + b, b updated after each step)
  with V2's group score, a group's best biased expert instead of the sum of its top two, so a group needs
  only one expert (``group_score_experts=1``) — the ablation that isolates the group score.
- bias_update ``sign_deadband``: the report's sign rule, but experts within 10% of the mean load keep
  their bias, so a balanced router stops oscillating by ±γ every step.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.checkpoint.hf_config import config_to_hf
from dsv3.config import ConfigError, MoEConfig, load_config
from dsv3.errors import CheckpointError
from dsv3.model import router
from dsv3.model.moe import MoE
from tests.rounding import gamma, routed_abs_sums, swiglu_chain, unit_roundoff, worst
from tests.test_moe import per_expert_reference
from tests.test_router import check_against_loop, make_gate

SOFTPLUS_THRESHOLD = 20.0   # torch's F.softplus default: softplus(z) = z above it


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits).sqrt()


def select_noaux_group_max(scores: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    choice = scores + bias.to(scores.dtype)
    if cfg.n_group > 1:
        choice = router.group_limited(choice, cfg, router.group_max)
    return router.stable_topk(choice, cfg.n_activated_experts)


def sign_deadband(load: torch.Tensor) -> torch.Tensor:
    mean = load.mean()
    return torch.where((mean - load).abs() > 0.1 * mean, torch.sign(mean - load), torch.zeros_like(load))


VARIANT = dict(scoring_func="sqrt_softplus", topk_method="noaux_group_max", bias_update="sign_deadband")


@pytest.fixture(autouse=True)
def registered():
    router.register_scoring("sqrt_softplus", sqrt_softplus)
    router.register_topk_method("noaux_group_max", select_noaux_group_max, biased=True, normalise_single=True)
    router.register_bias_update("sign_deadband", sign_deadband)
    yield
    for field, name in VARIANT.items():
        router.unregister(field, name)
    assert all(name not in router.names(field) for field, name in VARIANT.items())


# ------------------------------------------------------------------- the plain reference, in Python floats
def _rank(logits: list[float], bias: list[float], c: MoEConfig):
    """s, the biased scores, the group scores (or None) and the allowed experts of one token."""
    s = [math.sqrt(z if z > SOFTPLUS_THRESHOLD else math.log1p(math.exp(z))) for z in logits]
    biased = [v + b for v, b in zip(s, bias)]
    allowed, gscore = list(range(len(s))), None
    if c.n_group > 1:
        per = len(s) // c.n_group
        gscore = [max(biased[g * per:(g + 1) * per]) for g in range(c.n_group)]
        kept = sorted(range(c.n_group), key=lambda g: (-gscore[g], g))[:c.topk_group]
        allowed = [g * per + j for g in sorted(kept) for j in range(per)]
    return s, biased, gscore, allowed


def route_variant(logits: list[float], bias: list[float], c: MoEConfig):
    """One token: (chosen experts, gate weights), ties to the lower index, weights normalised even for k = 1."""
    s, biased, _, allowed = _rank(logits, bias, c)
    chosen = sorted(allowed, key=lambda i: (-biased[i], i))[:c.n_activated_experts]
    w = [s[i] for i in chosen]
    if c.norm_topk_prob:
        w = [v / sum(w) for v in w]
    return chosen, [v * c.routed_scaling_factor for v in w]


def margin(logits: list[float], bias: list[float], c: MoEConfig) -> float:
    """How far the token is from another choice: the gap at the kept-group boundary and at the top-k one."""
    _, biased, gscore, allowed = _rank(logits, bias, c)
    gaps = []
    if gscore is not None and c.topk_group < c.n_group:
        g = sorted(gscore, reverse=True)
        gaps.append(g[c.topk_group - 1] - g[c.topk_group])
    b = sorted((biased[i] for i in allowed), reverse=True)
    gaps.append(b[c.n_activated_experts - 1] - b[c.n_activated_experts])
    return min(gaps)


def weight_rel_bound(x: torch.Tensor, w_gate: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the relative distance two fp64 computations of the gate weights can be apart. Each side's
    logits are within δ = γ_dim·Σ_i|x_i w_i| of exact; s = √softplus(z) has ds/dz = s·σ(z)/(2 softplus(z))
    ≤ s/2 (softplus ≥ σ), so δ moves s by ≤ δ/2 relative; exp and log1p (≤ 1 ulp = 2u each in libm and
    SLEEF; log1p's condition ≤ 1) and sqrt (halves, then rounds once) add ≤ 3u. A weight is s_i over a sum
    of k positive s_j (γ_(k−1)), divided and scaled (2u; the gate's +1e-20 in a sum ≥ 0.1 is < u):
    ρ ≤ δ + 6u + (k + 2)u per side, twice for the two sides."""
    delta = gamma(x.shape[1]) * (x.abs() @ w_gate.abs().t()).amax(dim=1)
    return 2 * (delta + gamma(k + 8))


# ------------------------------------------------------------------------------------------------ tests
def test_config_validation_takes_the_registered_variant():
    cfg = load_config(None, [f"model.moe.{k}={v}" for k, v in VARIANT.items()]
                      + ["model.moe.n_group=16", "model.moe.topk_group=8", "model.moe.n_activated_experts=4"])
    assert {k: getattr(cfg.model.moe, k) for k in VARIANT} == VARIANT
    # one expert per group is fine here (group_score_experts=1); noaux_tc needs two
    assert cfg.model.moe.n_routed_experts // cfg.model.moe.n_group == 1
    with pytest.raises(ConfigError, match=r"1 expert per group, but noaux_tc scores a group by its top-2 experts"):
        load_config(None, ["model.moe.n_group=16", "model.moe.topk_group=8"])
    with pytest.raises(ConfigError, match=r"^model\.moe\.scoring_func: expected one of 'sigmoid', 'softmax', "
                                          r"'sqrt_softplus', got 'tanh' \(router variants"):
        load_config(None, ["model.moe.scoring_func=tanh"])
    # a variant the Hugging Face format cannot express trains, but is refused for export
    with pytest.raises(CheckpointError, match=r"scoring_func 'sqrt_softplus' \(a router variant registered in "
                                              r"dsv3/model/router\.py\) is not supported"):
        config_to_hf(cfg.model)
    with pytest.raises(router.UnknownVariant, match=r"topk_method: unknown router variant 'top3'.*'noaux_group_max'"):
        router.topk_method("top3")
    with pytest.raises(ValueError, match="already registered"):
        router.register_scoring("sqrt_softplus", sqrt_softplus)


KW = dict(n_routed_experts=32, n_activated_experts=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
          norm_topk_prob=True, **VARIANT)


def test_router_parity_with_the_plain_reference():
    """tests/test_router.py's check (the same experts bit for bit, weights close) with this variant's
    reference, then the weights within weight_rel_bound. (Realised: ≤ 0.02 of the bound; the sigmoid
    weights of the same experts exceed it ~10¹²×.)"""
    gate = make_gate(KW, bias_scale=0.05, dtype=torch.float64)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits = (x @ gate.weight.t()).tolist()
    bias = gate.e_score_correction_bias.double().tolist()
    # the precondition of comparing indices bitwise: every token ≥ 1e-6 from another choice, 10⁸× what
    # the two computations' rounding (weight_rel_bound's δ, ~1e-14) can move a score
    assert min(margin(z, bias, gate.cfg) for z in logits) > 1e-6
    counts = check_against_loop(gate, x, route=route_variant)
    assert sum(counts) == 200 * 4
    weights, _, _ = gate(x)
    w_ref = torch.tensor([route_variant(z, bias, gate.cfg)[1] for z in logits], dtype=torch.float64)
    bound = weight_rel_bound(x, gate.weight.detach(), 4)[:, None] * w_ref
    assert worst(weights, w_ref, bound) <= 1.0


def test_moe_layer_forward_backward_and_bias_update():
    """The MoE layer built on the variant (fp64, training mode): the output equals the per-token experts
    under the reference routing within the rounding bound of tests/test_moe.py plus the weights' bound;
    the loads are the reference's; the gradients of x and of the gate through √softplus match central
    differences (torch.autograd.gradcheck); the bias moves by γ·sign_deadband(loads)."""
    D, E, k, N = 8, 8, 2, 12
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=0, moe_inter_dim=6, n_activated_experts=k, n_group=4,
                    topk_group=2, routed_scaling_factor=1.5, aux_loss_alpha=0.0, **VARIANT)
    torch.manual_seed(0)
    moe = MoE(D, cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, E))
    x = torch.randn(1, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    flat, wg = x.view(N, D), moe.gate.weight.detach()
    logits, bias = (flat @ wg.t()).tolist(), moe.gate.e_score_correction_bias.double().tolist()
    # gradcheck moves inputs by 1e-6: every token ≥ 1e-3 from another choice keeps the routing fixed
    assert min(margin(z, bias, cfg) for z in logits) > 1e-3
    ref = [route_variant(z, bias, cfg) for z in logits]
    idx_ref = torch.tensor([c for c, _ in ref])
    w_ref = torch.tensor([w for _, w in ref], dtype=torch.float64)

    y = moe(x)
    with torch.no_grad():
        y_ref = per_expert_reference(flat, idx_ref, w_ref, moe.experts)
    tok, r = routed_abs_sums(moe.experts, flat, idx_ref, w_ref, torch.zeros(N, D))
    y_sums = torch.zeros(N, D, dtype=torch.float64).index_add(0, tok, r["y"])
    y_bound = (2 * gamma(swiglu_chain(D, 6) + k) + weight_rel_bound(flat, wg, k)[:, None]) * y_sums
    assert worst(y.view(N, D), y_ref, y_bound) <= 1.0
    loads = torch.bincount(idx_ref.flatten(), minlength=E)
    assert moe.tokens_per_expert.tolist() == loads.tolist()

    moe.eval()   # the loads stay as counted above

    def layer(x_in, w_gate):
        return torch.func.functional_call(moe, {"gate.weight": w_gate}, (x_in,))
    # central differences (f(v + ε) − f(v − ε)) / 2ε, ε = 1e-6: each evaluation of f is within y_bound / 2 of
    # exact (one side of the bound above), so rounding moves the difference quotient by ≤ max y_bound / 2ε;
    # twice that covers the truncation ε²/6·|f'''| (≤ 1e-12·|f'''|) and the rounded step. (Realised: the
    # Jacobians differ by ≤ 1.5e-9, atol ≈ 2e-6; a gate whose scores back-propagate sigmoid's derivative
    # instead is off by 0.86.)
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(True), wg.clone().requires_grad_(True)),
                                    eps=1e-6, atol=y_bound.max().item() / 1e-6, rtol=0, fast_mode=True)

    # the bias update on loads around a mean of 100: 95, 101 and 104 are inside the ±10% band (the plain
    # sign rule would move them), 80 and 120 outside it, 100 on the mean
    loads = torch.tensor([100, 95, 104, 120, 80, 100, 101, 100])
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias(loads, 0.01)
    step = torch.tensor([0, 0, 0, -1, 1, 0, 0, 0], dtype=torch.float32)
    assert torch.equal(moe.gate.e_score_correction_bias, before + 0.01 * step)
