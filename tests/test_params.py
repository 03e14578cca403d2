"""Parameter counts against the published figures (report §2, Table 1; the released configs), counted on
the meta device."""
from __future__ import annotations

import pytest

from conftest import config_path
from dsv3.config import load_config
from dsv3.model.params import count_params


def rel(a, b):
    return abs(a - b) / b


def test_dsv3_671b_counts():
    c = count_params(load_config(config_path("dsv3_671b.yaml")).model)
    assert rel(c.total, 671.03e9) < 0.005
    assert rel(c.activated, 37.55e9) < 0.005
    assert rel(c.activated_no_embed, 36.63e9) < 0.005
    assert rel(c.mtp, 11.6e9) < 0.005
    assert rel(c.mtp_stored, 13.5e9) < 0.005
    assert rel(c.total + c.mtp_stored, 685e9) < 0.005          # released checkpoint: 685B
    assert c.kv_values_per_token_layer == 576                  # c_KV 512 + k_rope 64


def test_v2_lite_counts():
    c = count_params(load_config(config_path("deepseek_v2_lite.yaml")).model)
    assert rel(c.total, 15.71e9) < 0.005
    assert rel(c.activated, 2.66e9) < 0.005
    assert rel(c.activated_no_embed, 2.45e9) < 0.005
    assert c.mtp == 0 and c.kv_values_per_token_layer == 576


def test_count_matches_a_real_model():
    """The meta-device count equals the numel of an instantiated small model, by hand for experts."""
    import torch
    from dsv3.model.transformer import Transformer
    cfg = load_config(config_path("debug.yaml")).model
    model = Transformer(cfg)
    c = count_params(cfg)
    assert c.total + c.mtp == sum(p.numel() for p in model.parameters())
    moe = cfg.moe
    expert = 3 * cfg.dim * moe.moe_inter_dim
    n_moe = cfg.n_layers - cfg.n_dense_layers
    assert c.total - c.activated == n_moe * (moe.n_routed_experts - moe.n_activated_experts) * expert
    assert c.activated - c.activated_no_embed == cfg.vocab_size * cfg.dim
    assert not any(b is p for b in model.buffers() for p in model.parameters())
    assert isinstance(model.layers[1].ffn.gate.e_score_correction_bias, torch.Tensor)
