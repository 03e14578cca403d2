"""One training loop for every layout: on one process, on EP2 (``parallelize()`` without a pipeline) and
on PP2, the step's LR / λ / γ / batch come from ``Schedule.at``, gradients are clipped by
``dsv3.training.optim.clip_coefficient`` and routing biases move only through ``MoE.update_bias`` — each
patched here to count its calls — and nothing else clips (torch's clip_grad_norm_ is patched to fail).
Every layout logs the global batch, the balance fields and the validation loss, and ends with the greedy
sample (under PP decoded through the stages: the one-process sample of the final checkpoint). And the
rule of ``train.micro_batch_size: auto``."""
from __future__ import annotations

import json
import os

import pytest

from tests.dist_utils import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
STEPS = 2
BASE = ["data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=4", f"train.steps={STEPS}",
        "train.warmup_steps=1", "train.sample_tokens=8", "train.eval_batches=1", "train.eval_every=1",
        "parallel.backend=gloo", "parallel.dispatcher=flat", f"data.cache_dir={CACHE}"]
BALANCE = ("bias", "bias_drift", "maxvio_accum", "groups_per_token", "balance_loss_layers", "tokens_per_expert")


def _counted_run(rank, world, out_dir, overrides):
    """Run dsv3.train with the shared functions wrapped by counters; returns the counts."""
    import torch
    import dsv3.training.lr_schedule as lr_schedule
    import dsv3.model.moe as moe
    import dsv3.training.optim as optim
    from dsv3.config import load_config
    from dsv3.train import train
    counts = {"schedule": 0, "clip": 0, "update_bias": 0}

    def counter(key, fn):
        def wrapped(*a, **kw):
            counts[key] += 1
            return fn(*a, **kw)
        return wrapped

    def forbidden(*a, **kw):
        raise AssertionError("only dsv3.training.optim.clip_coefficient may clip")
    lr_schedule.Schedule.at = counter("schedule", lr_schedule.Schedule.at)
    optim.clip_coefficient = counter("clip", optim.clip_coefficient)
    moe.MoE.update_bias = counter("update_bias", moe.MoE.update_bias)
    torch.nn.utils.clip_grad_norm_ = forbidden
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE + overrides + [f"train.out_dir={out_dir}"])
    counts["sample"] = train(cfg).get("sample")
    return counts


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "loss" in r], [r for r in recs if "val_loss" in r]


def _moe_layers():
    from dsv3.config import load_config
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE)
    return (cfg.model.n_layers - cfg.model.n_dense_layers) + cfg.model.mtp.depth


@pytest.mark.parametrize("layout,world,overrides", [
    ("one_process", 1, []),
    ("ep2", 2, ["parallel.ep=2"]),
    ("pp2", 2, ["parallel.pp=2", "train.batch_ramp={start_sequences: 2, tokens: 40}"]),
])
def test_every_layout_runs_the_one_loop(tmp_path, monkeypatch, layout, world, overrides):
    out = str(tmp_path / layout)
    if world == 1:
        for k in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(k, raising=False)
        counts = [_counted_run(0, 1, out, overrides)]
    else:
        counts = run_ranks(_counted_run, world, out, overrides, timeout=300)
    steps, evals = _records(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # the global batch, whatever the layout; under PP2 with the ramp: 2 sequences at 0 tokens, then
    # 2 + 2·30/40 = 3.5 → 3 after the first step's 2 × 15 tokens (rounded down, >= 2 chunks for 1F1B on 2)
    assert [r["sequences"] for r in steps] == ([2, 3] if layout == "pp2" else [4] * STEPS)
    n_moe = _moe_layers()
    for rank, c in enumerate(counts):
        assert c["schedule"] == STEPS, (rank, c)
        assert c["clip"] == STEPS, (rank, c)
        if layout != "pp2":   # a pipeline rank updates the biases of the layers it holds
            assert c["update_bias"] == STEPS * n_moe, (rank, c)
    if layout == "pp2":
        assert sum(c["update_bias"] for c in counts) >= STEPS * n_moe
        _pipeline_eval_equals_one_process(out, evals[-1]["val_loss"], [c["sample"] for c in counts])
    for r in steps:
        for k in BALANCE:
            assert k in r and len(r[k]) == n_moe, (k, r.get(k))
    assert len(evals) >= STEPS and all("val_maxvio" in e for e in evals)


def test_init_from_starts_fresh_from_another_runs_weights(tmp_path, capsys):
    """train.init_from: the weights and routing biases of another run at step 0 with a fresh optimizer (at
    LR 0 and γ 0 one step leaves them bitwise as loaded); a missing path is one line, exit 2."""
    from safetensors.torch import load_file
    from dsv3 import train as train_mod
    from dsv3.checkpoint.store import latest_checkpoint
    tiny = ["train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32", "train.sample_tokens=8",
            "train.eval_batches=1", "train.warmup_steps=1", f"data.cache_dir={CACHE}"]
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert train_mod.main(["configs/debug.yaml", *tiny, "train.steps=2", f"train.out_dir={src}"]) == 0
    assert train_mod.main(["configs/debug.yaml", *tiny, "train.steps=1", "train.lr=0", "train.seed=7",
                           "model.moe.bias_update_speed=0", f"train.init_from={src}", f"train.out_dir={dst}"]) == 0
    a = load_file(os.path.join(latest_checkpoint(src), "model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(dst), "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:3]
    with open(os.path.join(dst, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f if '"loss"' in line] == [1]   # step 0 → 1, not 3
    capsys.readouterr()
    code = train_mod.main(["configs/debug.yaml", *tiny, "train.steps=1", f"train.init_from={tmp_path}/nope",
                           f"train.out_dir={tmp_path}/x"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "nope" in err[0], err


def _pipeline_eval_equals_one_process(out_dir, val_loss, samples):
    """The pipeline's forward-only evaluation runs the very ops of Transformer.forward stage by stage, the
    hidden states handed on in the model's dtype: the final validation loss equals one process's on the
    same (final, sharded) checkpoint bit for bit, and the end sample (every rank's) is its greedy sample."""
    import torch
    from dsv3.checkpoint.store import latest_checkpoint, load_any_checkpoint
    from dsv3.config import load_config
    from dsv3.data.dataset import prepare_data
    from dsv3.model.transformer import Transformer
    from dsv3.training.loop import evaluate, sample_text
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), BASE + [f"train.out_dir={out_dir}"])
    model = Transformer(cfg.model)
    load_any_checkpoint(latest_checkpoint(out_dir), model, None, restore_rng=False)
    data = prepare_data(cfg.data, cfg.model.vocab_size, None, seed=cfg.train.seed)
    from contextlib import nullcontext
    assert evaluate(model, data, cfg, nullcontext) == val_loss
    expected = sample_text(model, data, cfg)
    assert len(data.tokenizer.encode(expected)) > len(data.tokenizer.encode(cfg.train.sample_prompt))
    assert samples == [expected] * len(samples), (samples, expected)
    assert torch.isfinite(torch.tensor(val_loss))


@pytest.mark.parametrize("global_batch,dp,pp,schedule,ramp_start,expected", [
    (16, 1, 1, "1f1b", 0, 16),          # one process: the whole batch in one forward (configs/debug.yaml)
    (16, 4, 2, "dualpipe", 0, 1),       # the Done-when layout: 4 sequences per replica, 4 chunks (>= 2·pp, even)
    (16, 2, 2, "dualpipe", 0, 2),       # 8 per replica: 2 → 4 chunks (4 → 2 < 2·pp)
    (16, 2, 2, "1f1b", 0, 4),           # 8 per replica: 4 → 2 chunks (>= pp)
    (30, 1, 2, "dualpipe", 0, 5),       # 6 → 5 chunks is odd, 10 → 3 odd, 15 → 2 too few: 5 → 6 chunks
    (30, 1, 2, "dualpipev", 0, 6),      # DualPipeV takes an odd count: 6 → 5 chunks >= 2·pp
    (16, 1, 1, "1f1b", 4, 4),           # a ramp from 4 sequences: the micro-batch divides the first batch
])
def test_micro_batch_size_auto(global_batch, dp, pp, schedule, ramp_start, expected):
    """``auto``: the largest micro-batch splitting the replica's batch into a count the schedule takes (the
    expected values worked by hand above); the layout then splits the global batch with it."""
    from dsv3.data.batch import check_layout, micro_batch_size
    from dsv3.config import load_config
    ramp = [f"train.batch_ramp={{start_sequences: {ramp_start}, tokens: 1000}}"] if ramp_start else []
    cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"),
                      [f"train.global_batch={global_batch}", f"parallel.pp={pp}", f"parallel.pp_schedule={schedule}"] + ramp)
    assert cfg.train.micro_batch_size == "auto"
    assert micro_batch_size(cfg.train, dp, pp, schedule) == expected
    assert check_layout(cfg.train, dp, pp, schedule) == global_batch // (dp * expected)


def test_micro_batch_size_auto_without_a_split_is_one_line(tmp_path):
    """4 sequences cannot give DualPipe on 4 stages its 8 chunks: exit 2, one line naming the numbers."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dsv3.tools.show_config", os.path.join(ROOT, "configs", "debug.yaml"),
                        "train.global_batch=4", "parallel.pp=4", "parallel.pp_schedule=dualpipe"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "train.micro_batch_size=auto" in r.stderr and "global_batch=4" in r.stderr and ">= 8" in r.stderr
