"""launch/slurm.sbatch runs under bash with SLURM_* set and `srun` stubbed to start 2 nodes × 4 local
ranks; the 8-rank data-parallel run's losses equal a one-process run on the same global batch."""
import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
ARGS = ["configs/debug.yaml", "train.steps=2", "data.seq_len=32", "train.sample_tokens=2", "train.eval_batches=1",
        f"data.cache_dir={CACHE}", "train.warmup_steps=1"]

SRUN = """#!/usr/bin/env bash
# stub: start one copy of the command per node, as srun --ntasks-per-node=1 would
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_slurm_two_nodes_of_four(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(SRUN)
    (bindir / "srun").chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="127.0.0.1", DSV3_NPROC_PER_NODE="4", DSV3_PYTHON=sys.executable,
               MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    out = tmp_path / "dist"
    proc = subprocess.run(["bash", "launch/slurm.sbatch", *ARGS, "train.micro_batch_size=1", "train.global_batch=8", f"train.out_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world 8" in proc.stdout
    ref = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "dsv3.train", *ARGS, "train.micro_batch_size=8", "train.global_batch=8", f"train.out_dir={ref}"],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    for a, b in zip(losses(out), losses(ref)):
        assert a == pytest.approx(b, rel=1e-5)
    assert len(losses(out)) == len(losses(ref)) == 2
