"""Runs through the parallel trainer (``dsv3.train`` → ``parallelize()`` → ``ParallelSteps``, ZeRO-1) on two
gloo ranks, all in one spawn (process start-up dominates):

- Resume, EP2: a run resumed from its step-2 sharded checkpoint takes steps 3–4 bitwise as the
  uninterrupted run does — losses, gradient norms, learning rates, token counts, routing biases — and
  its final checkpoint holds the same weights, AdamW moments and routing biases bit for bit.
- Kill and resume, PP2 under 1F1B: the run is SIGKILLed after step 3 (``DSV3_FAULT=step:3``, every rank,
  dsv3/training/faults.py) with its last checkpoint at step 2; ``train.resume=auto`` continues it, and steps 3–4
  and the final checkpoint equal the uninterrupted run's bit for bit.
  So the checkpoint carries the weights, AdamW moments, biases, the step and token counts and the data
  sampler's position through both layouts (tests/test_train.py checks the one-process loop).
- Schedules, EP2 (DP2) and PP2 (1F1B): the tiny run of tests/test_schedules_switch.py — λ, γ, the LR
  segments and the batch ramp switching on token counts — logs the values the report's rules give at the
  global token counts of the layout's own ramp (tests/test_schedules_switch.ramp)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests import test_schedules_switch as S
from tests.dist_utils import free_port, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
BASE = ["data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=4", "train.steps=4",
        "train.warmup_steps=1", "train.sample_tokens=2", "train.eval_batches=1", "train.eval_every=0",
        "train.ckpt_every=2", "parallel.backend=gloo", "parallel.dispatcher=flat",
        "model.n_layers=2", "model.dim=32", "model.inter_dim=48", "model.mla.n_heads=2", "model.mla.q_lora_rank=16",
        "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4",
        "model.mla.v_head_dim=8", "model.moe.moe_inter_dim=16", "model.mtp.depth=1", f"data.cache_dir={CACHE}"]
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")
EP2 = ["parallel.ep=2"]
PP2 = ["parallel.pp=2", "parallel.pp_schedule=1f1b"]
FIELDS = ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "tokens", "sequences", "bias")
KILL_STEP = 3


def _run(rank, world, runs):
    """The runs one after another in the same processes: (config file, overrides)."""
    from dsv3.config import load_config
    from dsv3.train import train
    for path, overrides in runs:
        train(load_config(path, overrides))
    return rank


def _killed_run(out_dir: str) -> None:
    """PP2 on two raw processes (a SIGKILL must not take the test's spawn down), both killed after step 3."""
    port, procs = free_port(), []
    for r in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                   LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="",
                   DSV3_FAULT=f"step:{KILL_STEP}")
        for k in ("DSV3_FAULT_RANK", "DSV3_FAULT_SIGNAL", "DSV3_FAULT_ERRNO"):
            env.pop(k, None)
        procs.append(subprocess.Popen([sys.executable, "-m", "dsv3.train", DEBUG, *BASE, *PP2,
                                       f"train.out_dir={out_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == -signal.SIGKILL, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    d = {k: str(tmp / k) for k in ("ep2_full", "ep2_resumed", "pp2_full", "pp2_killed", "sched_ep2", "sched_pp2")}
    _killed_run(d["pp2_killed"])
    sched = str(tmp / "sched.yaml")
    with open(sched, "w") as f:
        yaml.safe_dump(S.schedule_config(str(tmp / "unused")), f)
    par = ["parallel.backend=gloo", "parallel.dispatcher=flat"]
    todo = [(DEBUG, BASE + EP2 + [f"train.out_dir={d['ep2_full']}"]),
            (DEBUG, BASE + EP2 + [f"train.out_dir={d['ep2_resumed']}",
                                  f"train.resume={os.path.join(d['ep2_full'], 'ckpt_0000002')}"]),
            (DEBUG, BASE + PP2 + [f"train.out_dir={d['pp2_full']}"]),
            (DEBUG, BASE + PP2 + [f"train.out_dir={d['pp2_killed']}", "train.resume=auto"]),
            (sched, par + EP2 + [f"train.out_dir={d['sched_ep2']}"]),
            (sched, par + PP2 + [f"train.out_dir={d['sched_pp2']}"])]
    run_ranks(_run, 2, todo, timeout=400)
    return d


def _steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _same_continuation(full, resumed, resumed_steps):
    a, b = _steps(full), _steps(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == resumed_steps
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


def test_ep2_resume_is_bitwise(runs):
    _same_continuation(runs["ep2_full"], runs["ep2_resumed"], [3, 4])


def test_pp2_kill_and_resume_is_bitwise(runs):
    """The killed run logged step 3 before dying; the resumed run cut the log back to step 2 (its
    checkpoint) and took steps 3–4 again."""
    assert not os.path.isdir(os.path.join(runs["pp2_killed"], f"ckpt_{KILL_STEP:07d}"))
    _same_continuation(runs["pp2_full"], runs["pp2_killed"], [1, 2, 3, 4])


@pytest.mark.parametrize("layout,dp,fewest", [("ep2", 2, 1), ("pp2", 1, 2)])
def test_schedules_switch_on_global_token_counts(runs, layout, dp, fewest):
    """The same checks as the one-process run, at this layout's ramp: EP2's two replicas take 2 sequences
    per step until 128 tokens (tokens 0, 32, 64, 96, 128, then +64), 1F1B's two stages at least 2
    micro-batches (0, 32, 64, 96, 144, then +64) — so λ switches, γ stops and the LR segments change at
    other steps than in one process, by the global token count."""
    recs = S.read_records(runs[f"sched_{layout}"])
    seqs, before = S.ramp(dp, fewest)
    assert seqs != S.SEQUENCES
    S.check_tokens_and_batch_ramp(recs, seqs, before)
    S.check_lr(recs, before)
    S.check_mtp_weight(recs, before)
    S.check_bias_updates(recs, before)


def _checkpoint_state(path):
    """Every parameter, buffer and AdamW state tensor of a sharded checkpoint, read in one process."""
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from dsv3.training.optim import build_optimizer
    from parallel.dist_checkpoint import load_sharded_into_model
    cfg = load_config(DEBUG, BASE)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    load_sharded_into_model(path, model, opt)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[id(p)]}.{k}"] = torch.as_tensor(v).clone()
    return out
