"""Failure behaviour of multi-rank training: one rank is SIGKILLed in the middle of a transfer (a pipeline
P2P send, an expert all-to-all dispatch) at step 2, or frozen with SIGSTOP there (a hung rank, found
only by the timeout); every other rank must exit non-zero with one clear ``error: rank ...`` line
within parallel.timeout_s + 10 s of the kill, and the last complete sharded checkpoint (step 1; ckpt
every step) must load on one process with finite tensors.

Raw processes (not torchrun, which would kill the survivors itself): RANK / WORLD_SIZE / MASTER_* set here."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
KILL_STEP = 2
BASE = ["data.seq_len=16", "train.micro_batch_size=1", "train.steps=4", "train.ckpt_every=1", "train.warmup_steps=1",
        "parallel.backend=gloo", f"data.cache_dir={CACHE}"]
PP2 = ["parallel.pp=2", "parallel.pp_schedule=1f1b", "train.global_batch=2"]
EP4 = ["parallel.ep=4", "parallel.dispatcher=flat", "train.global_batch=4"]
CASES = {  # name: (world, overrides, fault point, victim rank, signal, parallel.timeout_s)
    "pp2_1f1b_p2p_kill": (2, PP2, "p2p", 1, "SIGKILL", 20),
    "pp1_dp4_ep4_a2a_kill": (4, EP4, "a2a", 2, "SIGKILL", 20),
    "pp2_1f1b_p2p_hang": (2, PP2, "p2p", 1, "SIGSTOP", 8),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, overrides: list[str], out_dir: str, fault: str, sig: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), DSV3_FAULT=fault, DSV3_FAULT_SIGNAL=sig, CUDA_VISIBLE_DEVICES="")
        env.pop("DSV3_FAULT_RANK", None)
        cmd = [sys.executable, "-m", "dsv3.train", "configs/debug.yaml", *BASE, *overrides, f"train.out_dir={out_dir}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


@pytest.mark.parametrize("name", list(CASES))
def test_rank_killed_mid_transfer(name, tmp_path):
    world, overrides, point, victim, sig, timeout_s = CASES[name]
    overrides = overrides + [f"parallel.timeout_s={timeout_s}"]
    out_dir = str(tmp_path / name)
    procs = _launch(world, overrides, out_dir, f"{point}:{KILL_STEP}:{victim}", sig)
    t_start = time.monotonic()
    hard_deadline = t_start + 240   # startup (imports, data, groups) plus the allowance below
    exit_at: dict[int, float] = {}
    kill_t = None   # when the victim died (SIGKILL) or froze (SIGSTOP)
    try:
        while len(exit_at) < world - 1 or (sig == "SIGKILL" and len(exit_at) < world):
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in exit_at and p.poll() is not None:
                    exit_at[r] = now
            if kill_t is None and (victim in exit_at or (sig == "SIGSTOP" and _stopped(procs[victim].pid))):
                kill_t = exit_at.get(victim, now)
            if kill_t is not None and now > kill_t + timeout_s + 10 + 5:
                break   # some survivor overran: fail below with what we know
            if now > hard_deadline:
                break
            time.sleep(0.05)
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
        outs = [p.communicate(timeout=30) for p in procs]
    report = "\n".join(f"--- rank {r} rc={p.returncode}\n{o[0][-1500:]}\n{o[1][-3000:]}"
                       for r, (p, o) in enumerate(zip(procs, outs)))
    # the victim died by its own SIGKILL (or froze) at the fault point, not earlier, not of something else
    assert procs[victim].returncode == -signal.SIGKILL, report
    assert kill_t is not None, report
    for r in range(world):
        if r == victim:
            continue
        assert r in exit_at, f"rank {r} still running {time.monotonic() - kill_t:.1f}s after the kill\n{report}"
        assert procs[r].returncode not in (0, None), report
        assert procs[r].returncode > 0, f"rank {r} was killed, it did not exit by itself\n{report}"
        waited = exit_at[r] - kill_t
        assert waited <= timeout_s + 10, f"rank {r} exited {waited:.1f}s after the kill\n{report}"
        err = outs[r][1]
        lines = [ln for ln in err.splitlines() if ln.startswith(f"error: rank {r}/{world}: step {KILL_STEP}:")]
        assert len(lines) == 1, report
        assert f"parallel.timeout_s={timeout_s}" in lines[0], lines[0]
        if sig == "SIGSTOP":   # nothing but the timeout can find a frozen peer
            assert waited >= timeout_s - 1, f"rank {r} gave up {waited:.1f}s after the freeze\n{report}"
        print(f"{name}: rank {r} exited rc={procs[r].returncode} {waited:.2f}s after rank {victim} was hit: {lines[0]}")

    # the last complete checkpoint is step 1 and loads on one process
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from dsv3.training.optim import build_optimizer
    from parallel.dist_checkpoint import latest_sharded, load_sharded_into_model
    ckpt = latest_sharded(out_dir)
    assert ckpt is not None and os.path.basename(ckpt) == f"ckpt_{KILL_STEP - 1:07d}", (ckpt, os.listdir(out_dir))
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE + overrides + [f"train.out_dir={out_dir}"])
    torch.manual_seed(123)   # not the run's seed: every loaded tensor must come from the checkpoint
    model = Transformer(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, cfg.train)
    meta = load_sharded_into_model(ckpt, model, opt)
    assert meta["step"] == KILL_STEP - 1 and meta["opt_step"] == KILL_STEP - 1, meta
    changed = 0
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        changed += int(not torch.equal(p, before[n]))
    assert changed == len(before), (changed, len(before))
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.isfinite(v).all(), k
    assert len(opt.state) == sum(1 for p in model.parameters() if p.requires_grad)
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            assert torch.isfinite(b).all(), n
    x = torch.randint(0, cfg.model.vocab_size, (2, 17))
    with torch.no_grad():
        loss = model(x[:, :-1], labels=x[:, 1:]).loss.item()
    assert 0 < loss < 20, loss
