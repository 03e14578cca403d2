"""Schedules that switch on token counts, read from a real run's metrics (report §2.2: λ 0.3 → 0.1;
§2.1.2: γ → 0; §4.2: LR segments by tokens and the batch-size ramp). One tiny one-process run whose
thresholds fall exactly on step boundaries, so an off-by-one (> for >=), a switch that never happens
or a segment that never ends changes a logged value. The expected values are written here from the
report's rules, not taken from dsv3.training.lr_schedule.

Tokens per sequence = data.seq_len = 16. Batch ramp 1 → 4 sequences over 128 tokens (micro-batch 1): a
step after t tokens takes ⌊1 + 3·t/128⌋ sequences until t reaches 128, then 4 — 1, 1, 1, 2, 2, 3, 4, 4, 4,
4 — so the tokens consumed before each step are 0, 16, 32, 48, 80, 112, 160, 224, 288, 352.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
SEQ, STEPS = 16, 10
SEQUENCES = [1, 1, 1, 2, 2, 3, 4, 4, 4, 4]
TOKENS_BEFORE = [0, 16, 32, 48, 80, 112, 160, 224, 288, 352]
LAMBDA_SWITCH, GAMMA_STOP, GAMMA = 48, 160, 0.25   # γ a power of 2: every bias is exact in fp32 and in the log
LR, WARMUP = 2e-3, 2
SEGMENTS = [dict(kind="constant", tokens=80, lr=1e-3), dict(kind="step", tokens=80, lr=5e-4),
            dict(kind="cosine", tokens=128, lr=1e-4)]     # boundaries at 80, 160 and 288 tokens


def expected_lr(step: int, tokens: int) -> float:
    """Report §4.2 written out for SEGMENTS: linear warmup over steps, then by cumulative tokens."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    if tokens < 80:
        return 1e-3
    if tokens < 160:
        return 5e-4
    if tokens < 288:    # cosine from 5e-4 to 1e-4 over [160, 288)
        return 1e-4 + 0.5 * (5e-4 - 1e-4) * (1 + math.cos(math.pi * (tokens - 160) / 128))
    return 1e-4


def schedule_config(run_dir: str) -> dict:
    """The tiny run's config (debug.yaml shrunk, the thresholds above); tests/test_layout_grads.py runs
    it through the parallel layouts."""
    with open(os.path.join(ROOT, "configs", "debug.yaml")) as f:
        cfg = yaml.safe_load(f)
    m = cfg["model"]
    m.update(dim=32, n_layers=2, inter_dim=48, max_seq_len=64)
    m["mla"].update(n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    m["moe"].update(n_routed_experts=8, moe_inter_dim=16, n_activated_experts=2, bias_update_speed=GAMMA,
                    bias_update_stop_tokens=GAMMA_STOP)
    m["mtp"].update(depth=1, lambda_start=0.3, lambda_end=0.1, lambda_switch_tokens=LAMBDA_SWITCH)
    cfg["data"].update(seq_len=SEQ, cache_dir=CACHE)
    cfg["train"] = dict(steps=STEPS, micro_batch_size=1, global_batch=4, lr=LR, warmup_steps=WARMUP,
                        lr_segments=SEGMENTS, batch_ramp=dict(start_sequences=1, tokens=128), ckpt_every=0,
                        eval_every=0, eval_batches=1, sample_tokens=2, out_dir=run_dir)
    return cfg


def ramp(dp: int = 1, fewest: int = 1) -> tuple[list[int], list[int]]:
    """Sequences per step and tokens before each step under the ramp (report §4.2: the batch grows with the
    tokens consumed) in a layout of ``dp`` replicas (micro-batch 1) whose schedule needs at least ``fewest``
    micro-batches per replica: ⌊(1 + 3·t/128) / dp⌋ micro-batches per replica, at least ``fewest``, until t
    reaches 128, then 4 / dp; the tokens are the global batch's."""
    seqs, before, t = [], [], 0
    for _ in range(STEPS):
        chunks = 4 // dp if t >= 128 else max(fewest, int((1 + 3 * t / 128) // dp))
        seqs.append(chunks * dp)
        before.append(t)
        t += chunks * dp * SEQ
    return seqs, before


def read_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    return recs


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched")
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(schedule_config(str(out / "run"))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DSV3_FAULT", None)
    proc = subprocess.run([sys.executable, "-m", "dsv3.train", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_records(str(out / "run"))


def test_tokens_and_batch_ramp(records):
    assert ramp() == (SEQUENCES, TOKENS_BEFORE)   # the rule as written above, one process
    check_tokens_and_batch_ramp(records, SEQUENCES, TOKENS_BEFORE)


def test_lr_segments_at_their_boundaries(records):
    check_lr(records, TOKENS_BEFORE)


def test_mtp_weight_switches_at_its_token_count(records):
    check_mtp_weight(records, TOKENS_BEFORE)


def test_bias_update_speed_stops_at_its_token_count(records):
    check_bias_updates(records, TOKENS_BEFORE)


def check_tokens_and_batch_ramp(records, sequences, before):
    assert [r["sequences"] for r in records] == sequences
    assert [r["tokens"] for r in records] == before[1:] + [before[-1] + sequences[-1] * SEQ]
    assert all(b - a == n * SEQ for a, b, n in zip(before, before[1:], sequences))


def check_lr(records, before):
    for i, r in enumerate(records):
        assert r["lr"] == pytest.approx(expected_lr(i, before[i]), rel=1e-12, abs=0), (i, r["lr"])


def check_mtp_weight(records, before):
    """λ recovered from the logged losses: loss = lm + λ·mtp + balance (eq. 25), each an fp32 value (unit
    roundoff u = 2⁻²⁴) rounded at most 3 times in the sum, so |λ̂ − λ| ≤ 3u·(lm + λ·mtp + balance)/mtp."""
    u = 2.0 ** -24
    for i, r in enumerate(records):
        lam = 0.1 if before[i] >= LAMBDA_SWITCH else 0.3
        est = (r["loss"] - r["lm_loss"] - r["balance_loss"]) / r["mtp_loss"]
        bound = 3 * u * (r["lm_loss"] + lam * r["mtp_loss"] + abs(r["balance_loss"])) / r["mtp_loss"]
        assert abs(est - lam) <= bound, (i + 1, est, lam)


def check_bias_updates(records, before):
    """b ← b + γ·sign(mean − load) per MoE layer after every step taken before GAMMA_STOP tokens, and no
    change after (γ = 0). The loads are the step's logged tokens per expert; the bias starts at zero."""
    prev = None
    for i, r in enumerate(records):
        bias, loads = r["bias"], r["tokens_per_expert"]
        assert len(bias) == 2                                       # the MoE layer and the MTP block's
        prev = prev or [[0.0] * len(b) for b in bias]
        gamma = GAMMA if before[i] < GAMMA_STOP else 0.0
        for b, p, load in zip(bias, prev, loads):
            mean = sum(load) / len(load)
            want = [pi + gamma * ((mean > x) - (mean < x)) for pi, x in zip(p, load)]
            assert b == want, (i + 1, b, want)
        prev = bias
