"""The run folder is owned, nothing in it is lost: a second run into a live run's folder is refused, a
stale lock is taken over, a fresh run never writes over an old run's checkpoints, a failing resume
rewrites nothing, metrics.jsonl is cut back to the resumed step, keep_last prunes, the divergence
guard skips non-finite steps (and stops after too many), and a second signal stops at once."""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import torch

from dsv3 import train as train_mod
from dsv3.training import local_steps
from dsv3.checkpoint.store import list_checkpoints
from dsv3.checkpoint.run_dir import LOCK_NAME, truncate_metrics
from dsv3.training.stops import Interrupted, StopRequests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
TINY = ["train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32", "train.sample_tokens=2", "train.eval_batches=1",
        "train.warmup_steps=1", f"data.cache_dir={CACHE}"]


def run(capsys, out, *args):
    code = train_mod.main(["configs/debug.yaml", *TINY, f"train.out_dir={out}", *args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for n in files:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def metrics_steps(out) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A finished 2-step run with a checkpoint per step."""
    out = str(tmp_path_factory.mktemp("run2"))
    assert train_mod.main(["configs/debug.yaml", *TINY, "train.steps=2", "train.ckpt_every=1",
                           f"train.out_dir={out}"]) == 0
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_live_lock_refuses_and_writes_nothing(capsys, tmp_path, run2):
    out = _copy(run2, tmp_path / "run")
    # a live owner: this very process (alive, same host), another start time, a fresh heartbeat
    lock = dict(pid=os.getpid(), host=socket.gethostname(), start=1.0, heartbeat=time.time())
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(lock, f)
    before = snapshot(out)
    code, err = run(capsys, out, "train.steps=3", "train.resume=auto")
    assert code == 2 and len(err) == 1 and "in use by another run" in err[0], err
    assert snapshot(out) == before


def test_stale_lock_is_taken_over(capsys, tmp_path, run2):
    out = _copy(run2, tmp_path / "run")
    lock = dict(pid=os.getpid(), host=socket.gethostname(), start=1.0, heartbeat=time.time() - 3600)
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(lock, f)
    code, err = run(capsys, out, "train.steps=3", "train.resume=auto")
    assert code == 0
    assert any("taking over the stale lock" in ln for ln in err), err
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released at exit
    assert metrics_steps(out) == [1, 2, 3]


def test_fresh_run_refuses_old_checkpoints_unless_overwrite(capsys, tmp_path, run2):
    out = _copy(run2, tmp_path / "run")
    before = snapshot(out)
    code, err = run(capsys, out, "train.steps=1")
    assert code == 2 and len(err) == 1 and "train.overwrite=true" in err[0], err
    assert snapshot(out) == before
    code, _ = run(capsys, out, "train.steps=1", "train.overwrite=true")
    assert code == 0
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["ckpt_0000001"]
    assert metrics_steps(out) == [1]


def test_failing_resume_rewrites_nothing(capsys, tmp_path, run2):
    out = _copy(run2, tmp_path / "run")
    before = snapshot(out)
    code, err = run(capsys, out, "train.steps=3", "train.resume=auto", "model.dim=64")  # shape change
    assert code == 2 and len(err) == 1 and "the model expects" in err[0], err
    assert snapshot(out) == before  # config.yaml, corpus.json, metrics.jsonl, checkpoints untouched


def test_metrics_cut_back_to_the_resumed_step(capsys, tmp_path, run2):
    import shutil
    out = _copy(run2, tmp_path / "run")
    shutil.rmtree(os.path.join(out, "ckpt_0000002"))  # as if killed after step 2 was logged, before its save
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 1.0')  # and a line cut mid-write
    code, _ = run(capsys, out, "train.steps=3", "train.resume=auto")
    assert code == 0
    assert metrics_steps(out) == [1, 2, 3]


def test_truncate_metrics_keeps_eval_lines(tmp_path):
    lines = [dict(step=1, loss=3.0), dict(step=1, val_loss=2.0), dict(step=2, loss=2.5), dict(step=3, loss=2.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert truncate_metrics(str(tmp_path), 1) == 2
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == lines[:2]


def test_keep_last(capsys, tmp_path):
    out = str(tmp_path / "run")
    code, _ = run(capsys, out, "train.steps=3", "train.ckpt_every=1", "train.keep_last=2")
    assert code == 0
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["ckpt_0000002", "ckpt_0000003"]


class _PoisonedTransformer(train_mod.Transformer):
    """The model whose loss turns NaN on chosen training steps (counted per forward in train mode,
    one micro-batch per step), so NaN reaches the real gradients, the norm and the guard."""
    nan_steps: set = set()

    def forward(self, *a, **kw):
        out = super().forward(*a, **kw)
        if self.training:
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls in self.nan_steps:
                out.loss = out.loss * float("nan")
        return out


@pytest.mark.parametrize("nan_steps,code,kept", [({2}, 0, [1, 2, 3]), ({2, 3}, 3, [1, 2])])
def test_divergence_guard(capsys, monkeypatch, tmp_path, nan_steps, code, kept):
    monkeypatch.setattr(_PoisonedTransformer, "nan_steps", nan_steps)
    monkeypatch.setattr(train_mod, "Transformer", _PoisonedTransformer)
    out = str(tmp_path / "run")
    weights = {}
    orig_save = local_steps.save_checkpoint

    def save(run_dir, step, model, optimizer, state):
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return orig_save(run_dir, step, model, optimizer, state)
    monkeypatch.setattr(local_steps, "save_checkpoint", save)
    got, err = run(capsys, out, "train.steps=3", "train.ckpt_every=1", "train.max_skipped_steps=2")
    assert got == code, err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    assert [bool(r.get("skipped")) for r in recs] == [s in nan_steps for s in range(1, len(recs) + 1)]
    assert [int(os.path.basename(p)[5:]) for p in list_checkpoints(out)] == kept
    for s in kept:
        assert all(torch.isfinite(v).all() for v in weights[s].values())
    if 2 in nan_steps and kept[-1] >= 2:  # a skipped step leaves weights and routing biases as they were
        for k in weights[1]:
            assert torch.equal(weights[1][k], weights[2][k]), k
    if code == 3:
        assert len(err) == 1 and "diverged" in err[0] and "2 consecutive" in err[0], err


def test_second_signal_stops_at_once():
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.request == signal.SIGTERM  # the first only asks
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.exit_code == 130
    assert stops.agreed() == signal.SIGTERM


def test_time_limit_stops_cleanly(capsys, tmp_path):
    out = str(tmp_path / "run")
    code, err = run(capsys, out, "train.steps=50", "train.time_limit_s=0.001")
    assert code == 0
    assert len(err) == 1 and "stopped by train.time_limit_s after step 1" in err[0], err
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["ckpt_0000001"]
