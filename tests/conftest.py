"""Shared fixtures for the model tests: repo paths and a tiny model config built from debug.yaml."""
from __future__ import annotations

import os

import pytest
import torch

from dsv3.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
collect_ignore = ["mutation"]  # the mutation check (tests/mutation/run.py) is not part of the suite


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name)


def tiny_cfg(*overrides: str):
    """debug.yaml shrunk further: 2 layers (1 dense, 1 MoE), vocab 97, no MTP unless overridden."""
    base = ["model.vocab_size=97", "model.dim=32", "model.n_layers=2", "model.inter_dim=48",
            "model.max_seq_len=64", "data.seq_len=32", "model.mla.n_heads=2", "model.mla.q_lora_rank=24",
            "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
            "model.mla.v_head_dim=8", "model.moe.n_routed_experts=8", "model.moe.moe_inter_dim=16",
            "model.moe.n_activated_experts=2", "model.moe.n_group=4", "model.moe.topk_group=2",
            "model.mtp.depth=0"]
    return load_config(config_path("debug.yaml"), base + list(overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
