"""Multi-Token Prediction (report §2.2, eq. 21–25): the depth loss on a hand-built example, the module's
wiring against a recomputation from its raw weights (random, distinct norms), the total loss = LM + λ·MTP + balance, and a released-layout
checkpoint's MTP layer against a forward written from its raw tensor names."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from dsv3.model.transformer import Transformer
from dsv3.model.mtp import mtp_depth_loss, shifted


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
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():   # norms all different and not 1: a swapped or skipped norm changes the loss
        for mod in model.mtp:
            for norm in (mod.enorm, mod.hnorm, mod.norm):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g, dtype=torch.float64))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)

    # reference from the raw weights (eq. 21–23), no MTP module code: h'_i = M_k[RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k−1})]
    # (enorm on the embedding, first; hnorm on the hidden state); only the main trunk and the block are reused
    eps = cfg.norm_eps
    h = model.hidden(ids)
    V = cfg.vocab_size
    W_emb, W_head = model.embed.weight, model.head.weight
    lm = F.cross_entropy(F.linear(_rms(h, model.norm.weight, eps), W_head).reshape(-1, V), labels.reshape(-1),
                         ignore_index=-100)
    cos, sin = model.rope(0, ids.shape[1])
    depth_losses = []
    for k, mod in enumerate(model.mtp, start=1):
        emb = F.embedding(torch.cat([ids[:, k:], ids.new_zeros(2, k)], dim=1), W_emb)
        x = torch.cat([_rms(emb, mod.enorm.weight, eps), _rms(h, mod.hnorm.weight, eps)], dim=-1)
        h = mod.block(F.linear(x, mod.eh_proj.weight), cos, sin)
        logits = F.linear(_rms(h, mod.norm.weight, eps), W_head)
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


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _hf_mtp_checkpoint(path):
    """A DeepSeek-V3 checkpoint in the released layout with one MTP layer (model.layers.3): transformers'
    DeepseekV3 builds the 3 main layers and the MTP layer's decoder block (as a 4th layer); enorm, hnorm,
    eh_proj and shared_head.norm are added under their raw names, each random and all different."""
    import json
    import os
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from test_hf import SHAPE, randomize
    cfg = DeepseekV3Config(**{**SHAPE, "num_hidden_layers": 4}, q_lora_rank=24, n_shared_experts=1, n_group=4,
                           topk_group=2, routed_scaling_factor=2.5, rope_interleave=True)
    hf = DeepseekV3ForCausalLM(cfg).eval()
    randomize(hf)
    hf.save_pretrained(path)
    g = torch.Generator().manual_seed(3)
    D = cfg.hidden_size
    raw = {"enorm": 1 + 0.5 * torch.randn(D, generator=g), "hnorm": 1 + 0.5 * torch.randn(D, generator=g),
           "shared_head.norm": 1 + 0.5 * torch.randn(D, generator=g),
           "eh_proj": torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5}
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for name, t in raw.items():
        tensors[f"model.layers.3.{name}.weight"] = t
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    conf.update(num_hidden_layers=3, num_nextn_predict_layers=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    return hf, raw


def test_mtp_from_hf_checkpoint_equals_forward_from_raw_tensor_names(tmp_path):
    """The MTP layer of a released-layout checkpoint (report §2.2, Figure 3; the official inference code's
    order): h' = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), the MTP decoder block, shared_head.norm, the
    shared head — written here from the raw tensors with transformers' decoder layers as the blocks — equals
    our loaded model's MTP logits and L_1. Norms are random and differ from each other, so swapping
    enorm/hnorm in the module or in the name map moves the logits by O(1)."""
    from dsv3.checkpoint.hf import load_hf_checkpoint
    hf, raw = _hf_mtp_checkpoint(str(tmp_path))
    ours = load_hf_checkpoint(str(tmp_path)).eval()
    assert ours.cfg.mtp.depth == 1 and ours.cfg.n_layers == 3
    eps, m = hf.config.rms_norm_eps, hf.model
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(5))
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]

    def block(layer, x):
        return layer(x, attention_mask=mask, position_ids=pos, position_embeddings=m.rotary_emb(x, pos))

    with torch.no_grad():
        h = m.embed_tokens(ids)
        for layer in m.layers[:3]:
            h = block(layer, h)
        lm_logits = hf.lm_head(m.norm(h))
        emb = m.embed_tokens(shifted(ids, 1, 0))

        def mtp_logits(e_w, h_w):
            x = torch.cat([_rms(emb, e_w, eps), _rms(h, h_w, eps)], dim=-1) @ raw["eh_proj"].T
            return _rms(block(m.layers[3], x), raw["shared_head.norm"], eps) @ hf.lm_head.weight.T
        ref = mtp_logits(raw["enorm"], raw["hnorm"])
        swapped = mtp_logits(raw["hnorm"], raw["enorm"])

        h_ours = ours.hidden(ids)
        cos, sin = ours.rope(0, T)
        got = ours.head(ours.mtp[0].norm(ours.mtp[0](h_ours, ours.embed(shifted(ids, 1, 0)), cos, sin)))
        labels = torch.roll(ids, -1, 1)
        labels[:, -1] = -100
        out = ours(ids, labels=labels)
    # fp32 on both sides, the same weights: test_hf's whole-model bound (1e-4 on logits of size ~5)
    assert (ours.head(ours.norm(h_ours)) - lm_logits).abs().max() < 1e-4
    assert (got - ref).abs().max() < 1e-4
    assert (swapped - ref).abs().max() > 1e-1           # the test can see the swap
    target = shifted(labels, 1, -100)
    l1 = F.cross_entropy(ref.reshape(-1, 96), target.reshape(-1), ignore_index=-100, reduction="sum") / ids.numel()
    assert out.mtp_loss.item() == pytest.approx(l1.item(), rel=1e-5)
