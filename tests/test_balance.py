"""Load balancing: aux-loss-free bias updates (report §2.1.2), the complementary sequence-wise loss
(eq. 17–20) and its gradient path (AuxLossScaler)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_cfg
from dsv3.config import MoEConfig
from dsv3.model.transformer import Transformer
from dsv3.model.moe import MoE, balance_loss, max_violation

DIM, E, K = 16, 16, 2


def skewed_moe(gamma: float) -> MoE:
    """Logits ~ N(0, 0.2²) per token plus a fixed per-expert offset in [−0.05, 0.05] (a constant input
    feature), so the unbiased router prefers the high-offset experts (MaxVio ≈ 1)."""
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=0, moe_inter_dim=4, n_activated_experts=K, n_group=4,
                    topk_group=2, aux_loss_alpha=0.0, bias_update_speed=gamma)
    moe = MoE(DIM + 1, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate.weight[:, :DIM].copy_(torch.randn(E, DIM, generator=g) * 0.2 / DIM ** 0.5)
        moe.gate.weight[:, DIM].copy_(torch.linspace(-0.05, 0.05, E)[torch.randperm(E, generator=g)])
        for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3):
            w.normal_(0, 0.1, generator=g)
    return moe


def tokens(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(1, n, DIM + 1, generator=torch.Generator().manual_seed(seed))
    x[..., DIM] = 1.0
    return x


def eval_maxvio(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        _, idx, _ = moe.gate(x.flatten(0, 1))
    return max_violation(torch.bincount(idx.flatten(), minlength=E))


def run_updates(gamma: float, steps: int = 200):
    moe = skewed_moe(gamma).train()
    held_out = tokens(32768, seed=12345)
    start = eval_maxvio(moe, held_out)
    for step in range(steps):
        with torch.no_grad():
            moe(tokens(2048, seed=step))                     # accumulates tokens_per_expert
        moe.update_bias(moe.tokens_per_expert, gamma)
        moe.tokens_per_expert.zero_()
    return moe, start, eval_maxvio(moe, held_out)


def test_bias_updates_cut_maxvio_and_gamma_zero_changes_nothing():
    moe, start, end = run_updates(1e-3)
    assert start > 0.5                                        # the offsets really skew the router
    assert end < 0.2 * start, (start, end)
    b = moe.gate.e_score_correction_bias
    assert b.abs().max() <= 200 * 1e-3 + 1e-9 and b.abs().max() > 0.01
    frozen, start0, end0 = run_updates(0.0)
    assert end0 == start0 == start
    assert frozen.gate.e_score_correction_bias.abs().max() == 0


def test_update_bias_is_gamma_times_sign():
    moe = skewed_moe(1e-3)
    load = torch.tensor([5.0, 1, 3, 3] + [3] * (E - 4))        # mean 3
    moe.update_bias(load, 1e-3)
    expected = torch.tensor([-1e-3, 1e-3, 0, 0] + [0] * (E - 4))
    torch.testing.assert_close(moe.gate.e_score_correction_bias, expected, rtol=0, atol=1e-12)


def test_model_bias_is_a_buffer_and_survives_state_dict():
    cfg = tiny_cfg().model
    model = Transformer(cfg).train()
    moe = next(model.moe_layers())
    assert not any(p is moe.gate.e_score_correction_bias for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    assert not any("e_score_correction_bias" in n for n in names)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids)
    loads = model.expert_loads()
    assert [int(l.sum()) for l in loads] == [2 * 16 * cfg.moe.n_activated_experts]
    model.update_bias(loads, 0.01)
    bias = moe.gate.e_score_correction_bias.clone()
    expected = 0.01 * torch.sign(loads[0].mean() - loads[0])
    torch.testing.assert_close(bias, expected)
    assert all(float(l.sum()) == 0 for l in model.expert_loads())          # counts reset after the update
    # the optimizer never touches it, even with weight decay
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(moe.gate.e_score_correction_bias, bias)
    sd = model.state_dict()
    key = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert len(key) == 1 and torch.equal(sd[key[0]], bias)
    fresh = Transformer(cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(next(fresh.moe_layers()).gate.e_score_correction_bias, bias)


def test_sequence_loss_is_alpha_under_uniform_routing():
    alpha, B, T, n_exp, k = 1e-4, 3, 8, 8, 2
    scores = torch.full((B * T, n_exp), 0.37, dtype=torch.float64)
    # each sequence: token t picks experts 2t mod 8 and 2t+1 mod 8 → every expert exactly K·T/N = 2 times
    idx = torch.tensor([[(2 * t) % n_exp, (2 * t + 1) % n_exp] for t in range(T)] * B)
    assert balance_loss(scores, idx, B, alpha, per_sequence=True).item() == pytest.approx(alpha, rel=1e-14, abs=0)
    assert balance_loss(scores, idx, B, alpha, per_sequence=False).item() == pytest.approx(alpha, rel=1e-14, abs=0)


def test_sequence_loss_differs_from_batch_loss():
    """Sequence A routes only to experts {0,1}, B only to {2,3}: each sequence is imbalanced (f = [2,2,0,0],
    P = [.4,.4,.1,.1] → Σ fP = 1.6) while the batch as a whole is balanced (f = 1, P = 1/4 → 1.0)."""
    alpha = 1e-4
    sa, sb = [0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]
    scores = torch.tensor([sa, sa, sb, sb], dtype=torch.float64)
    idx = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]])
    assert balance_loss(scores, idx, 2, alpha, per_sequence=True).item() == pytest.approx(1.6 * alpha, rel=1e-12)
    assert balance_loss(scores, idx, 2, alpha, per_sequence=False).item() == pytest.approx(1.0 * alpha, rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_balance_loss_gradient_reaches_gate_and_equals_direct(scale):
    """grad of (y·g) with the loss on = grad with it off + scale · grad of α Σ f P computed here by hand."""
    alpha, B, T, D = 0.05, 2, 12, 16
    base = dict(n_routed_experts=8, n_shared_experts=1, moe_inter_dim=8, n_activated_experts=2, n_group=1,
                topk_group=1, aux_loss_type="sequence")
    x = torch.randn(B, T, D, dtype=torch.float64)
    g = torch.randn(B, T, D, dtype=torch.float64)

    def gate_grad(a):
        torch.manual_seed(0)
        moe = MoE(D, MoEConfig(**base, aux_loss_alpha=a)).double().train()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.3)
        moe.aux_loss_scale = scale
        (moe(x) * g).sum().backward()
        return moe, moe.gate.weight.grad.clone()

    moe, with_aux = gate_grad(alpha)
    _, without = gate_grad(0.0)
    W = moe.gate.weight.detach().clone().requires_grad_(True)
    s = torch.sigmoid(x.reshape(B * T, D) @ W.t())
    idx = torch.sort(s.detach() + moe.gate.e_score_correction_bias, dim=-1, descending=True, stable=True).indices[:, :2]
    direct = 0.0
    for b in range(B):
        sb, ib = s[b * T:(b + 1) * T], idx[b * T:(b + 1) * T]
        f = torch.bincount(ib.flatten(), minlength=8).double() * 8 / (2 * T)     # N_r/(K_r·T) Σ_t 1[i ∈ topK]
        P = (sb / sb.sum(-1, keepdim=True)).mean(0)
        direct = direct + alpha * (f * P).sum() / B
    direct.backward()
    assert W.grad.abs().max() > 1e-6
    torch.testing.assert_close(with_aux, without + scale * W.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(moe.last_balance_loss, direct.detach(), rtol=1e-12, atol=0)
