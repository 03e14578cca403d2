"""launch/slurm.sbatch runs under bash with SLURM_* set and `srun` stubbed to start 2 nodes × 4 local
ranks; the 8-rank data-parallel run's losses equal a one-process run on the same global batch. With a
recording `srun`: each node's torchrun command line (read by torchrun's own parser) and environment,
CPUs included; the backend checked before srun; launch/env.sh never installing a CPU torch on a GPU machine."""
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
               SLURM_JOB_NODELIST="127.0.0.1", DSV3_NPROC_PER_NODE="4", DSV3_PYTHON=sys.executable, DSV3_NO_INSTALL="1",
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


# ------------------------------------------------------------------ each node's command line and environment
RECORD_SRUN = """#!{py}
# stub: record, per node, the srun options, the command and the environment the command would run with
import json, os, sys
opts, args = [], sys.argv[1:]
while args and args[0].startswith("--"):
    opts.append(args.pop(0))
cpus = [o.split("=", 1)[1] for o in opts if o.startswith("--cpus-per-task=")]
for n in range(int(os.environ["SLURM_JOB_NUM_NODES"])):
    env = dict(os.environ, SLURM_NODEID=str(n), SLURM_PROCID=str(n))
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus[0]      # what srun sets for the task it starts
    with open(os.path.join(os.environ["RECORD_DIR"], f"node{{n}}.json"), "w") as f:
        json.dump(dict(opts=opts, argv=args, env=env), f)
"""
SCONTROL = """#!/usr/bin/env bash
# stub: `scontrol show hostnames node[01-02]`
[ "$1 $2 $3" = "show hostnames node[01-02]" ] && printf 'node01\\nnode02\\n'
"""


def _stub_bin(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("srun", RECORD_SRUN.format(py=sys.executable)), ("scontrol", SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(stat.S_IRWXU)
    return bindir


def _sbatch(tmp_path, args, **env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "DSV3_"))}
    env.update(PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node[01-02]", SLURM_CPUS_ON_NODE="16", DSV3_NPROC_PER_NODE="4",
               DSV3_PYTHON=sys.executable, DSV3_NO_INSTALL="1", MASTER_PORT="29611", RECORD_DIR=str(tmp_path))
    env.update(env_over)
    return subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_slurm_node_command_lines_and_environment(tmp_path):
    """Each node's task: srun gives it all 16 CPUs of the node, its 4 ranks 16/4 = 4 OpenMP threads each, and
    torchrun's own parser reads the command as 2 nodes × 4 ranks meeting at the first host of the node list."""
    from torch.distributed.run import get_args_parser

    from dsv3.config import load_config
    user = ["train.steps=3", "train.global_batch=16"]
    proc = _sbatch(tmp_path, ["configs/debug.yaml", *user])
    assert proc.returncode == 0, proc.stderr
    for n in range(2):
        rec = json.loads((tmp_path / f"node{n}.json").read_text())
        assert rec["opts"] == ["--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
        env = rec["env"]
        assert (env["SLURM_NODEID"], env["SLURM_CPUS_PER_TASK"], env["OMP_NUM_THREADS"]) == (str(n), "16", "4")
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["PYTHONUNBUFFERED"] == "1"
        assert rec["argv"][:3] == [sys.executable, "-m", "torch.distributed.run"]
        a = get_args_parser().parse_args(rec["argv"][3:])
        assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id) == \
               ("2", "4", "c10d", "node01:29611", "4242")
        assert a.module and a.training_script == "dsv3.train"
        assert a.training_script_args == ["configs/debug.yaml", "parallel.backend=gloo", "parallel.nodes=2",
                                          "parallel.ranks_per_node=4", *user]
        cfg = load_config(os.path.join(ROOT, a.training_script_args[0]), a.training_script_args[1:])
        assert (cfg.parallel.backend, cfg.parallel.nodes, cfg.parallel.ranks_per_node, cfg.train.steps) == \
               ("gloo", 2, 4, 3)


TORCH_PROBE = """#!/usr/bin/env bash
# stub interpreter: answers launch/env.sh's torch probe as a torch build "{info}" would
echo "{info}"
"""


@pytest.mark.parametrize("torch_info,how,want", [
    ("2.13.0+cpu - 0", dict(SLURM_GPUS_ON_NODE="4"), None),         # a GPU job, CPU torch: not gloo
    ("2.13.0+cpu - 0", dict(DSV3_BACKEND="nccl"), None),
    ("2.13.0+cpu - 0", "parallel.backend=nccl", None),
    ("2.5.1+cu124 12.4 4", dict(SLURM_GPUS_ON_NODE="4"), "nccl"),   # a CUDA torch seeing 4 GPUs
    ("2.13.0+cpu - 0", dict(), "gloo")])
def test_slurm_backend_is_checked_before_srun(tmp_path, torch_info, how, want):
    """The requested backend (auto: nccl in a GPU job) against what the interpreter's torch reports: an
    unavailable one is one line and exit 2 before srun, never a quiet fallback to gloo."""
    py = tmp_path / "python"
    py.write_text(TORCH_PROBE.format(info=torch_info))
    py.chmod(stat.S_IRWXU)
    args = ["configs/debug.yaml"] + ([how] if isinstance(how, str) else [])
    proc = _sbatch(tmp_path, args, DSV3_PYTHON=str(py), **(how if isinstance(how, dict) else {}))
    if want is None:
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: backend nccl needs a CUDA build of torch"), proc.stderr
        assert "torch 2.13.0+cpu (CUDA: none, GPUs seen: 0)" in lines[0]
        assert not list(tmp_path.glob("node*.json"))
    else:
        assert proc.returncode == 0, proc.stderr
        rec = json.loads((tmp_path / "node1.json").read_text())
        assert f"parallel.backend={want}" in rec["argv"]


FAKE_PY = """#!/usr/bin/env bash
# stub interpreter without torch; records a pip call
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "{log}"; exit 0; fi
exit 1
"""


@pytest.mark.parametrize("gpus,no_install", [(True, "0"), (False, "1")])
def test_env_never_installs_a_cpu_torch_on_a_gpu_machine(tmp_path, gpus, no_install):
    """launch/env.sh with an interpreter lacking torch: on a GPU machine (nvidia-smi lists a GPU) or with
    DSV3_NO_INSTALL=1 it prints one line and exits 2 without calling pip."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "pip.log"
    (bindir / "python").write_text(FAKE_PY.format(log=log))
    if gpus:
        (bindir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 80GB HBM3'\n")
    for f in bindir.iterdir():
        f.chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DSV3_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bindir}:{os.environ['PATH']}", DSV3_PYTHON=str(bindir / "python"), DSV3_NO_INSTALL=no_install)
    proc = subprocess.run(["bash", "-c", "source launch/env.sh && echo sourced"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sourced" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert ("NVIDIA GPUs" in lines[0]) == gpus and ("DSV3_NO_INSTALL=1" in lines[0]) == (not gpus)
    assert not log.exists()
