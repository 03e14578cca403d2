"""Graceful stops of a multi-rank run (ZeRO-1 over 2 gloo ranks, the ``parallelize()`` trainer): SIGTERM
to one rank only, or SIGINT to every rank, at step 2 — every rank finishes step 2, the sharded
checkpoint of step 2 is written, every rank exits 143 / 130 with one line, and the resumed run's
losses equal an uninterrupted run's bit for bit.

Raw processes (RANK / WORLD_SIZE / MASTER_* set here); the signal comes from the fault point
``step:2[:rank]`` with ``DSV3_FAULT_SIGNAL`` (the process signals itself right after the step)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from parallel.sim.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
WORLD, STEPS, STOP = 2, 4, 2
BASE = ["data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=2", f"train.steps={STEPS}", "train.warmup_steps=1",
        "train.sample_tokens=2", "train.eval_batches=1", "parallel.backend=gloo", "parallel.timeout_s=60",
        f"data.cache_dir={CACHE}"]


def _run(out_dir: str, extra=(), fault=None, sig=None) -> list[tuple[int, str]]:
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   LOCAL_WORLD_SIZE=str(WORLD), CUDA_VISIBLE_DEVICES="")
        for k in ("DSV3_FAULT", "DSV3_FAULT_RANK", "DSV3_FAULT_SIGNAL"):
            env.pop(k, None)
        if fault:
            env.update(DSV3_FAULT=fault, DSV3_FAULT_SIGNAL=sig)
        cmd = [sys.executable, "-m", "dsv3.train", "configs/debug.yaml", *BASE, f"train.out_dir={out_dir}", *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, err))
    return out


def _losses(out_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    res = _run(out)
    assert all(rc == 0 for rc, _ in res), res
    return _losses(out)


@pytest.mark.parametrize("sig,victim,code", [("SIGTERM", "1", 143), ("SIGINT", None, 130)])
def test_signal_stops_every_rank_after_the_same_step(reference, tmp_path, sig, victim, code):
    out = str(tmp_path / "run")
    fault = f"step:{STOP}" + (f":{victim}" if victim is not None else "")
    res = _run(out, fault=fault, sig=sig)
    report = "\n".join(f"--- rank {r} rc={rc}\n{err[-2000:]}" for r, (rc, err) in enumerate(res))
    for rc, err in res:
        assert rc == code, report
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[W")]
        assert len(lines) == 1 and f"stopped by {sig} after step {STOP}" in lines[0], report
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == [f"ckpt_{STOP:07d}"]
    assert _losses(out) == reference[:STOP]
    if victim is None:
        return
    res = _run(out, ["train.resume=auto"])
    assert all(rc == 0 for rc, _ in res), res
    assert _losses(out) == reference  # bitwise, each step once (metrics cut back to the checkpoint)
