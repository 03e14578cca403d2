"""Training loop: crash at a random point (mid accumulation, mid checkpoint write, after a step),
resume with train.resume=auto, and every later loss is bitwise equal to an uninterrupted run's;
plus the LR schedule against the report's figures and AdamW against torch's."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from dsv3.config import load_config
from dsv3.data.batch import micro_batches_at
from dsv3.training.lr_schedule import lr_at
from dsv3.training.optim import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
STEPS = 6
SMALL = [f"train.steps={STEPS}", "train.micro_batch_size=4", "train.global_batch=8", "data.seq_len=64",
         "train.ckpt_every=2", "train.sample_tokens=4", "train.eval_batches=1", "train.warmup_steps=2",
         f"data.cache_dir={CACHE}"]


def run_train(out_dir: str, extra=(), fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DSV3_FAULT", None)
    if fault:
        env["DSV3_FAULT"] = fault
    cmd = [sys.executable, "-m", "dsv3.train", "configs/debug.yaml", *SMALL, f"train.out_dir={out_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def step_losses(out_dir: str) -> dict[int, float]:
    """The last logged loss of every step (a resumed run re-logs the steps after its checkpoint)."""
    losses = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                losses[r["step"]] = r["loss"]
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    proc = run_train(out)
    assert proc.returncode == 0, proc.stderr
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.parametrize("point", ["micro", "ckpt", "step"])
def test_kill_and_resume_is_bitwise(reference, tmp_path, point):
    rng = random.Random(f"kill-{point}")
    # "ckpt" kills inside a checkpoint write, so only steps that write one (every 2nd)
    step = rng.choice([2, 4] if point == "ckpt" else list(range(2, STEPS)))
    out = str(tmp_path)
    killed = run_train(out, fault=f"{point}:{step}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "ckpt":
        # the half-written checkpoint never appears under its final name
        assert not os.path.exists(os.path.join(out, f"ckpt_{step:07d}"))
    resumed = run_train(out, ["train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:   # steps after the checkpoint logged once, not twice
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == list(range(1, STEPS + 1))
    got = step_losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s] == reference[s], f"step {s}: {got[s]!r} != {reference[s]!r} after a kill at {point}:{step}"


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_checkpoints_and_resumes_bitwise(reference, tmp_path, sig, code):
    """SIGTERM (a Slurm preemption) or Ctrl-C at step 3: the step finishes, ckpt_0000003 is written (not a
    ckpt_every step), one line, exit 143 / 130; the resumed run logs each step once, losses bitwise equal."""
    out = str(tmp_path)
    env = dict(os.environ, DSV3_FAULT_SIGNAL=sig)
    stopped = subprocess.run([sys.executable, "-m", "dsv3.train", "configs/debug.yaml", *SMALL, f"train.out_dir={out}"],
                             cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1", DSV3_FAULT="step:3"), capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == code, stopped.stderr
    lines = [ln for ln in stopped.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"stopped by {sig} after step 3" in lines[0], stopped.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_0000002", "ckpt_0000003"]
    resumed = run_train(out, ["train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    assert step_losses(out) == reference


def test_lr_schedule_matches_report():
    t = load_config(os.path.join(ROOT, "configs", "dsv3_671b.yaml")).train
    assert lr_at(t, 0, 0) == pytest.approx(2.2e-4 / 2000)
    assert lr_at(t, 1999, 0) == pytest.approx(2.2e-4)
    assert lr_at(t, 10_000, int(5e12)) == pytest.approx(2.2e-4)
    mid_cosine = int(10e12 + 4.3e12 / 2)
    assert lr_at(t, 10_000, mid_cosine) == pytest.approx((2.2e-4 + 2.2e-5) / 2)
    assert lr_at(t, 10_000, int(14.3e12) - 1) == pytest.approx(2.2e-5, rel=1e-6)
    assert lr_at(t, 10_000, int(14.5e12)) == pytest.approx(2.2e-5)
    assert lr_at(t, 10_000, int(14.3e12 + 333e9 + 1)) == pytest.approx(7.3e-6)
    # batch ramp 3072 → 15360 sequences over the first 469B tokens (micro-batch 1), one replica and no pipeline
    assert micro_batches_at(t, 0) == 3072
    assert micro_batches_at(t, int(469e9 / 2)) == (3072 + 15360) // 2
    assert micro_batches_at(t, int(469e9)) == 15360


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_adamw_matches_torch(moment_dtype):
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(7, 5))
    p_our = torch.nn.Parameter(p_ref.detach().clone())
    ref = torch.optim.AdamW([p_ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    our = AdamW([p_our], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, moment_dtype=moment_dtype)
    for _ in range(10):
        g = torch.randn(7, 5)
        p_ref.grad, p_our.grad = g.clone(), g.clone()
        ref.step()
        our.step()
    tol = 1e-6 if moment_dtype == torch.float32 else 2e-3
    assert (p_ref - p_our).abs().max().item() < tol
    # BF16 moments stay BF16 through a state_dict round trip
    again = AdamW([torch.nn.Parameter(p_our.detach().clone())], lr=1e-2, moment_dtype=moment_dtype)
    again.load_state_dict(our.state_dict())
    assert next(iter(again.state.values()))["exp_avg"].dtype == moment_dtype
