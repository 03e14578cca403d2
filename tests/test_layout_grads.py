"""Resume through the parallel trainer (``parallelize()`` → ``ParallelSteps``, EP2 with ZeRO-1): a run
resumed from its step-2 sharded checkpoint takes steps 3–4 bitwise as the uninterrupted run does — the
same losses, gradient norms, learning rates, token counts and routing biases, and its final checkpoint
holds the same weights, AdamW moments and routing biases bit for bit — so the checkpoint carries
the weights, AdamW moments, biases, the step and token counts and the data sampler's position through
this layout too (tests/test_train.py checks the one-process loop)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
BASE = ["data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=4", "train.steps=4",
        "train.warmup_steps=1", "train.sample_tokens=2", "train.eval_batches=1", "train.eval_every=0",
        "train.ckpt_every=2", "parallel.backend=gloo", "parallel.dispatcher=flat", "parallel.ep=2",
        "model.n_layers=2", "model.dim=32", "model.inter_dim=48", "model.mla.n_heads=2", "model.mla.q_lora_rank=16",
        "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
        "model.mla.v_head_dim=8", "model.moe.moe_inter_dim=16", "model.mtp.depth=1", f"data.cache_dir={CACHE}"]
FIELDS = ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "sequences", "bias")


def _run(rank, world, runs):
    """The runs one after another in the same processes (one spawn: process start-up dominates)."""
    from dsv3.config import load_config
    from dsv3.train import train
    for overrides in runs:
        train(load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE + overrides))
    return rank


def _steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("layout", ["ep2"])
def test_parallel_resume_is_bitwise(tmp_path, layout):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    ckpt = os.path.join(full, "ckpt_0000002")
    run_ranks(_run, 2, [[f"train.out_dir={full}"], [f"train.out_dir={resumed}", f"train.resume={ckpt}"]],
              timeout=300)
    assert os.path.isdir(ckpt)
    a, b = _steps(full), _steps(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert a[3]["tokens"] == 3 * 4 * 16
    for s in (3, 4):
        for k in FIELDS:
            assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])
    assert a[3]["loss"] != a[2]["loss"]
    # and the final sharded checkpoints hold the same weights, AdamW moments and step, and routing biases
    states = [_checkpoint_state(os.path.join(d, "ckpt_0000004")) for d in (full, resumed)]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 50
    assert any(k.endswith("exp_avg_sq") for k in states[0]) and any(k.endswith("correction_bias") for k in states[0])
    for k, t in states[0].items():
        assert torch.equal(t, states[1][k]), k


def _checkpoint_state(path):
    """Every parameter, buffer and AdamW state tensor of a sharded checkpoint, read in one process."""
    from dsv3.config import load_config
    from dsv3.model import Transformer
    from dsv3.optim import build_optimizer
    from parallel.dist_checkpoint import load_sharded_into_model
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    load_sharded_into_model(path, model, opt)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}.{k}"] = torch.as_tensor(v).clone()
    return out
