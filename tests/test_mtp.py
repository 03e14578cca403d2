"""Multi-Token Prediction (report §2.2, eq. 21–25): the depth loss on a hand-built example, the module's
wiring against a step-by-step recomputation, and the total loss = LM + λ·MTP + balance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from dsv3.model import Transformer
from dsv3.mtp import mtp_depth_loss, shifted


def test_depth_loss_hand_computed():
    """T = 3, V = 2, k = 1. Position i predicts labels[i+1]: pos 0 → p = 1/2, pos 1 → p = 3/4, pos 2 has no
    target. L_1 = −(1/T)(ln ½ + ln ¾) = ln(8/3)/3 — divided by T, not by the 2 valid positions (eq. 24)."""
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, 0]])
    assert mtp_depth_loss(logits, labels, 1).item() == pytest.approx(math.log(8 / 3) / 3, rel=1e-6)
    # depth 2: only position 0 has a target (labels[2] = 0, p = 1/2)
    assert mtp_depth_loss(logits, labels, 2).item() == pytest.approx(math.log(2) / 3, rel=1e-6)
    # ignore_index in the labels is skipped as well
    assert mtp_depth_loss(logits, torch.tensor([[1, -100, 0]]), 1).item() == pytest.approx(math.log(4 / 3) / 3, rel=1e-6)
    assert shifted(torch.tensor([[1, 2, 3, 4]]), 2, -1).tolist() == [[3, 4, -1, -1]]


@pytest.mark.parametrize("depth", [1, 2])
def test_model_loss_is_lm_plus_lambda_mtp_plus_balance(depth):
    cfg = tiny_cfg(f"model.mtp.depth={depth}", "model.moe.aux_loss_alpha=0.01").model
    model = Transformer(cfg).double().train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)

    # step-by-step reference from the submodules (eq. 21–23): h'_i = M_k[RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k−1})]
    h = model.hidden(ids)
    V = cfg.vocab_size
    lm = F.cross_entropy(model.head(model.norm(h)).reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    cos, sin = model.rope(0, ids.shape[1])
    depth_losses = []
    for k, mod in enumerate(model.mtp, start=1):
        emb = model.embed(torch.cat([ids[:, k:], ids.new_zeros(2, k)], dim=1))
        h = mod.block(mod.eh_proj(torch.cat([mod.enorm(emb), mod.hnorm(h)], dim=-1)), cos, sin)
        logits = model.head(mod.norm(h))
        target = torch.cat([labels[:, k:], labels.new_full((2, k), -100)], dim=1)   # t_{i+1+k}
        ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
        depth_losses.append(ce / ids.numel())
    mtp = torch.stack(depth_losses).mean()
    balance = sum(m.last_balance_loss for m in model.moe_layers())
    assert len(list(model.moe_layers())) == 1 + depth         # the MTP blocks are MoE blocks too

    assert model.mtp_weight == 0.3                             # λ for the first 10T tokens
    torch.testing.assert_close(out.lm_loss, lm.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.mtp_loss, mtp.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.balance_loss, balance, rtol=1e-12, atol=0)
    assert out.balance_loss.item() > 0
    expected = lm + 0.3 * mtp + balance
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # λ switch: the trainer sets mtp_weight = λ2
    model.mtp_weight = 0.1
    assert model(ids, labels=labels).loss.item() == pytest.approx((lm + 0.1 * mtp + balance).item(), rel=1e-12)


def test_mtp_shares_embedding_and_head():
    cfg = tiny_cfg("model.mtp.depth=1").model
    model = Transformer(cfg)
    mtp_params = {id(p) for p in model.mtp.parameters()}
    assert id(model.embed.weight) not in mtp_params and id(model.head.weight) not in mtp_params
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    out = model(ids, labels=ids)
    head_grad_lm = torch.autograd.grad(out.loss, model.head.weight)[0]
    model.mtp_weight = 0.0
    out0 = model(ids, labels=ids)
    head_grad_no_mtp = torch.autograd.grad(out0.loss, model.head.weight)[0]
    assert (head_grad_lm - head_grad_no_mtp).abs().max() > 1e-6     # MTP's loss reaches the shared head
