"""The fused, chunked head + cross-entropy (dsv3/model/loss.py) equals the head's logits through
F.cross_entropy — loss, dh and dW — in fp64, fp32 and under BF16 autocast, with ignored targets and
with several chunks; and the model's training loss equals the unfused computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv3.model.fast.head_loss as L
from dsv3.model.layers import Linear


def _case(dtype, n=300, dim=24, vocab=70):
    g = torch.Generator().manual_seed(0)
    head = Linear(dim, vocab).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g, dtype=dtype) * 0.3)
    h = torch.randn(n, dim, generator=g, dtype=dtype)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::7] = -100
    return head, h, t


def _grads(fn, head, h, t):
    hh = h.clone().requires_grad_(True)
    head.weight.grad = None
    loss = fn(head, hh, t)
    (loss * 0.37).backward()
    return loss.detach(), hh.grad, head.weight.grad.clone()


def _reference(head, h, t):
    logits = head(h)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t,
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fused_equals_cross_entropy(monkeypatch, dtype, tol):
    head, h, t = _case(dtype)
    monkeypatch.setattr(L, "LOGIT_CHUNK_ELEMENTS", 128 * 70)     # 128 rows: 3 chunks, the last partial
    got, ref = _grads(L.head_cross_entropy, head, h, t), _grads(_reference, head, h, t)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert got[1][::7].abs().max() == 0            # ignored rows get no gradient


def test_fused_under_bf16_autocast_matches_autocast_reference():
    head, h, t = _case(torch.float32, n=512, dim=64, vocab=256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(L.head_cross_entropy, head, h, t)
        ref = _grads(_reference, head, h, t)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=0)
    for a, b in zip(got[1:], ref[1:]):   # BF16 GEMMs on both sides: agree to BF16 rounding
        assert (a - b).norm() <= 1e-2 * b.norm()


def test_no_grad_path_and_model_loss_equal_unfused():
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from dsv3.model.mtp import mtp_depth_loss, shifted
    from tests.conftest import config_path
    cfg = load_config(config_path("debug.yaml"), ["data.seq_len=16"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).double()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.logits is None and len(model.mtp) > 0
    h = model.hidden(ids[:, :-1])
    lm = F.cross_entropy(model.head(model.norm(h)).flatten(0, 1), ids[:, 1:].flatten())
    cos, sin = model.rope(0, 16)
    hk, mtp = h, []
    for k, module in enumerate(model.mtp, start=1):
        hk = module(hk, model.embed(shifted(ids[:, :-1], k, 0)), cos, sin)
        mtp.append(mtp_depth_loss(model.head(module.norm(hk)), ids[:, 1:], k))
    assert abs(out.lm_loss.item() - lm.item()) < 1e-12
    assert abs(out.mtp_loss.item() - torch.stack(mtp).mean().item()) < 1e-12
    with torch.no_grad():
        assert abs(model(ids[:, :-1], labels=ids[:, 1:]).lm_loss.item() - lm.item()) < 1e-12
