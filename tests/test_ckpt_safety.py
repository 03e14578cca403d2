"""Checkpoints never execute what a checkpoint file holds, never keep a partial write, never store NaN.

Sharded (2 gloo ranks, ZeRO-1): a `.metadata` pickle whose ``__reduce__`` would create a file (DCP's own
reader runs it: checked) is refused by the manifest, and — when the attacker rewrote the manifest too —
by the restricted unpickler, also through ``python -m dsv3.checkpoint.hf export`` (exit 2, one line). ENOSPC on
one rank mid-write, or on rank 0 while committing: every rank raises the same one-line error, the temp
folder is gone and the previous checkpoint loads bitwise. One process: the same for ENOSPC through
the trainer, edited state.json, refused pickles and NaN. Plus pruning and the clean-up of partials."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from dsv3.checkpoint.store import (NonFiniteCheckpointError, latest_checkpoint, load_checkpoint, prune_checkpoints,
                             read_state, remove_stale_partials, save_checkpoint)
from dsv3.errors import CheckpointError
from tests.conftest import REPO, tiny_cfg
from tests.dist_utils import run_ranks

ROWS, SEQ = 2, 16   # per rank
OVERRIDES = ("data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=4")


class _Plant:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _digest(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder))}


def _rehash(ckpt, name, manifest="manifest.json"):
    """The attacker's move: make the manifest agree with an edited file."""
    mpath = os.path.join(ckpt, manifest)
    m = json.load(open(mpath))
    data = open(os.path.join(ckpt, name), "rb").read()
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    json.dump(m, open(mpath, "w"))


# ------------------------------------------------------------------------------------- sharded
def _build(rank):
    from dsv3.model.transformer import Transformer
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    cfg = tiny_cfg(*OVERRIDES)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    rows = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(rank))
    return cfg, model, pm, rows


def _worker(rank, world, run_dir):
    from parallel.dist_checkpoint import latest_sharded, load_sharded, save_sharded
    cfg, model, pm, rows = _build(rank)
    out = {}
    pm.train_step(rows, cfg.train.lr, model.mtp_weight)
    save_sharded(run_dir, 1, pm, dict(tokens=64, sampler={"epoch": 0, "index": 2}))
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm.train_step(rows, cfg.train.lr, model.mtp_weight)      # the state moves on after the checkpoint
    for name, fault in (("enospc_rank1_dcp", "ckpt_write:2:1"), ("enospc_rank0_commit", "ckpt:2:0")):
        os.environ.update(DSV3_FAULT=fault, DSV3_FAULT_ERRNO="ENOSPC")
        try:
            save_sharded(run_dir, 2, pm, dict(tokens=128, sampler={"epoch": 0, "index": 4}))
        except CheckpointError as e:
            out[name] = str(e)
        finally:
            del os.environ["DSV3_FAULT"], os.environ["DSV3_FAULT_ERRNO"]
        out[name + "_listing"] = sorted(os.listdir(run_dir))
    entry = next(iter(pm.zero.entries.values()))
    if rank == 1:   # one rank's shard diverged: every rank refuses
        entry.master.data[0] = float("nan")
    try:
        save_sharded(run_dir, 3, pm, dict(tokens=192, sampler={"epoch": 0, "index": 6}))
    except NonFiniteCheckpointError as e:
        out["nonfinite"] = str(e)
    out["nonfinite_listing"] = sorted(os.listdir(run_dir))
    meta = load_sharded(latest_sharded(run_dir), pm)         # the previous checkpoint, on the same layout
    out["meta"] = meta
    out["resumed_equal"] = all(torch.equal(p, saved[n]) for n, p in model.named_parameters())
    out["saved"] = saved if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sharded_run"))
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:   # what dsv3.train writes: hf export needs it
        from dsv3.config import to_dict
        yaml.safe_dump(to_dict(tiny_cfg(*OVERRIDES)), f, sort_keys=False)
    results = run_ranks(_worker, 2, run_dir, timeout=300)
    return run_dir, results


def test_sharded_enospc_and_nan_every_rank_agrees(sharded):
    run_dir, results = sharded
    for name in ("enospc_rank1_dcp", "enospc_rank0_commit"):
        msgs = [r.get(name) for r in results]
        assert msgs[0] is not None and msgs[0] == msgs[1], msgs      # every rank raised, the same line
        assert "\n" not in msgs[0] and msgs[0].startswith("disk full while writing checkpoint"), msgs[0]
        assert "ckpt_0000002" in msgs[0] and "ckpt_0000001 is intact" in msgs[0], msgs[0]
        assert ("rank 1:" if "rank1" in name else "rank 0:") in msgs[0], msgs[0]
        assert results[0][name + "_listing"] == ["ckpt_0000001", "config.yaml"], results[0][name + "_listing"]
    msgs = [r.get("nonfinite") for r in results]
    assert msgs[0] is not None and msgs[0] == msgs[1] and "rank 1's shard" in msgs[0] and "NaN" in msgs[0], msgs
    assert results[0]["nonfinite_listing"] == ["ckpt_0000001", "config.yaml"]
    for r in results:   # the failed saves left checkpoint 1 whole: it resumes bitwise on the same layout
        assert r["meta"]["step"] == 1 and r["meta"]["tokens"] == 64 and r["resumed_equal"], r["meta"]


def test_sharded_loads_on_one_process_bitwise_and_exports(sharded, tmp_path):
    from dsv3.checkpoint.hf import load_hf_checkpoint, main as hf_main
    from dsv3.model.transformer import Transformer
    from parallel.dist_checkpoint import latest_sharded, load_sharded_into_model
    run_dir, results = sharded
    ckpt = latest_sharded(run_dir)
    assert ckpt == latest_checkpoint(run_dir) == os.path.join(run_dir, "ckpt_0000001")
    torch.manual_seed(123)
    model = Transformer(tiny_cfg(*OVERRIDES).model)
    meta = load_sharded_into_model(ckpt, model)
    assert meta["sampler"] == {"epoch": 0, "index": 2}
    saved = results[0]["saved"]
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[n]), n
    out = str(tmp_path / "hf")
    assert hf_main(["export", run_dir, out, "--dtype", "fp32"]) == 0      # export reads sharded runs too
    back = dict(load_hf_checkpoint(out).named_parameters())
    assert torch.equal(back["layers.1.ffn.experts.w1"], saved["layers.1.ffn.experts.w1"])


@pytest.fixture
def planted(sharded, tmp_path):
    """A copy of the run whose .metadata is a pickle that would `touch MARKER`."""
    run_dir, _ = sharded
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    marker = str(tmp_path / "PWNED")
    ckpt = os.path.join(run, "ckpt_0000001")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(_Plant(marker), f)
    return run, ckpt, marker


def test_planted_metadata_pickle_is_never_run(planted, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from parallel.dist_checkpoint import load_sharded_into_model
    run, ckpt, marker = planted
    from dsv3.model.transformer import Transformer
    model = Transformer(tiny_cfg(*OVERRIDES).model)
    # (a) the manifest refuses the replaced file before it is read
    with pytest.raises(CheckpointError, match=r"\.metadata is truncated or corrupted|sha256 mismatch"):
        load_sharded_into_model(ckpt, model)
    assert not os.path.exists(marker)
    # (b) the attacker rewrote the manifest too: the restricted unpickler refuses os.system
    _rehash(ckpt, ".metadata")
    with pytest.raises(CheckpointError, match=r"refusing to unpickle '(posix|os)\.system'") as e:
        load_sharded_into_model(ckpt, model)
    assert "\n" not in str(e.value) and not os.path.exists(marker)
    # (c) end to end: the export CLI exits 2 with one line, creates neither the marker nor OUT
    out = str(tmp_path / "hf_out")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dsv3.checkpoint.hf", "export", run, out], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln and "cpu = _conversion" not in ln]
    assert proc.returncode == 2 and len(lines) == 1 and "refusing to unpickle" in lines[0], proc.stderr
    assert not os.path.exists(marker) and not os.path.exists(out)
    # the reproduction is real: torch's own reader runs the payload
    with pytest.raises(AttributeError):   # after running it, it finds no Metadata object
        FileSystemReader(ckpt).read_metadata()
    assert os.path.exists(marker)


def _edit_json(path, fn):
    m = json.load(open(path))
    fn(m)
    json.dump(m, open(path, "w"))


@pytest.mark.parametrize("edit, match", [
    (lambda c: os.remove(os.path.join(c, "manifest.json")), "manifest.json is missing"),
    (lambda c: _edit_json(os.path.join(c, "manifest.json"), lambda m: m["files"][".metadata"].pop("bytes")),
     "no valid 'bytes'"),
    (lambda c: _edit_json(os.path.join(c, "manifest.json"), lambda m: m["files"].pop("meta.json")),
     "does not list meta.json"),
    (lambda c: open(os.path.join(c, "manifest.json"), "w").write("{not json"), "not valid JSON"),
    (lambda c: open(os.path.join(c, "__1_0.distcp"), "r+b").write(b"\0"), "sha256 mismatch"),
    (lambda c: (_edit_json(os.path.join(c, "meta.json"), lambda m: m.pop("sampler")), _rehash(c, "meta.json")),
     "no valid 'sampler'"),
])
def test_sharded_edited_checkpoint_is_one_line(sharded, tmp_path, edit, match):
    from dsv3.model.transformer import Transformer
    from parallel.dist_checkpoint import latest_sharded, load_sharded_into_model
    ckpt = str(tmp_path / "ckpt_0000001")
    shutil.copytree(os.path.join(sharded[0], "ckpt_0000001"), ckpt)
    edit(ckpt)
    with pytest.raises(CheckpointError, match=match) as e:
        load_sharded_into_model(ckpt, Transformer(tiny_cfg(*OVERRIDES).model))
    assert "\n" not in str(e.value)
    if not os.path.exists(os.path.join(ckpt, "manifest.json")):
        assert latest_sharded(str(tmp_path)) is None and latest_checkpoint(str(tmp_path)) is None


def test_sharded_metadata_pointing_outside_the_manifest(sharded, tmp_path):
    from dsv3.model.transformer import Transformer
    from dsv3.checkpoint.dcp_safe import read_metadata
    from parallel.dist_checkpoint import load_sharded_into_model
    ckpt = str(tmp_path / "ckpt_0000001")
    shutil.copytree(os.path.join(sharded[0], "ckpt_0000001"), ckpt)
    mpath = os.path.join(ckpt, ".metadata")
    md = read_metadata(mpath, open(mpath, "rb").read(), os.listdir(ckpt))
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../etc/passwd"
    with open(mpath, "wb") as f:
        pickle.dump(md, f)
    _rehash(ckpt, ".metadata")
    with pytest.raises(CheckpointError, match="points outside the checkpoint's manifest"):
        load_sharded_into_model(ckpt, Transformer(tiny_cfg(*OVERRIDES).model))


def test_sharded_planted_tensor_pickle_is_refused(sharded, tmp_path):
    """The data files are unpickled too (torch.load): only with weights_only=True, whatever torch's default."""
    from dsv3.model.transformer import Transformer
    from dsv3.checkpoint.dcp_safe import read_metadata
    from parallel.dist_checkpoint import load_sharded_into_model
    ckpt = str(tmp_path / "ckpt_0000001")
    shutil.copytree(os.path.join(sharded[0], "ckpt_0000001"), ckpt)
    marker = str(tmp_path / "PWNED")
    torch.save(_Plant(marker), os.path.join(ckpt, "__0_0.distcp"))
    size = os.path.getsize(os.path.join(ckpt, "__0_0.distcp"))
    mpath = os.path.join(ckpt, ".metadata")
    md = read_metadata(mpath, open(mpath, "rb").read(), os.listdir(ckpt))
    for info in md.storage_data.values():
        if info.relative_path == "__0_0.distcp":
            info.offset, info.length = 0, size
    with open(mpath, "wb") as f:
        pickle.dump(md, f)
    _rehash(ckpt, ".metadata")
    _rehash(ckpt, "__0_0.distcp")
    with pytest.raises(CheckpointError, match="it is not a plain tensor") as e:
        load_sharded_into_model(ckpt, Transformer(tiny_cfg(*OVERRIDES).model))
    assert "\n" not in str(e.value) and not os.path.exists(marker)


# --------------------------------------------------------------------------------- one process
def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


STATE = dict(tokens=10, sampler={"epoch": 0, "index": 1})


def test_one_process_enospc_through_the_fault_point(tmp_path, monkeypatch):
    run = str(tmp_path)
    model, opt = _tiny()
    first = save_checkpoint(run, 1, model, opt, STATE)
    before = _digest(first)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setenv("DSV3_FAULT", "ckpt_write:2")
    monkeypatch.setenv("DSV3_FAULT_ERRNO", "ENOSPC")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(run, 2, model, opt, STATE)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("disk full while writing checkpoint"), msg
    assert "ckpt_0000001 is intact" in msg, msg
    assert sorted(os.listdir(run)) == ["ckpt_0000001"]
    assert _digest(first) == before
    fresh = torch.nn.Linear(4, 3)
    load_checkpoint(first, fresh, torch.optim.AdamW(fresh.parameters()))
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_one_process_enospc_in_the_trainer_exits_2_one_line(tmp_path):
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", DSV3_FAULT="ckpt_write:2", DSV3_FAULT_ERRNO="ENOSPC")
    cmd = [sys.executable, "-m", "dsv3.train", "configs/debug.yaml", "train.steps=2", "train.ckpt_every=1",
           "train.micro_batch_size=2", "train.global_batch=2", "data.seq_len=32", "train.warmup_steps=1",
           "train.sample_tokens=2", "train.eval_batches=1", f"data.cache_dir={os.path.join(REPO, '.cache', 'dsv3')}",
           f"train.out_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert proc.returncode == 2 and len(errors) == 1 and "disk full while writing checkpoint" in errors[0], proc.stderr
    assert [n for n in os.listdir(out) if "ckpt" in n] == ["ckpt_0000001"]
    assert read_state(os.path.join(out, "ckpt_0000001"))["step"] == 1     # whole: every sha256 matches


def _saved(tmp_path):
    model, opt = _tiny()
    return save_checkpoint(str(tmp_path), 1, model, opt, STATE), model, opt


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["files"]["optimizer.pt"].pop("bytes"), "no valid 'bytes'"),
    (lambda m: m["files"].pop("rng.pt"), "does not list rng.pt"),
    (lambda m: m.pop("sampler"), "no valid 'sampler'"),
    (lambda m: m.pop("step"), "no valid 'step'"),
    (lambda m: m.update(tokens="many"), "no valid 'tokens'"),
    (lambda m: m.update(files=[]), "no 'files' table"),
])
def test_one_process_edited_state_json(tmp_path, edit, match):
    ckpt, model, opt = _saved(tmp_path)
    _edit_json(os.path.join(ckpt, "state.json"), edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(ckpt, model, opt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_one_process_refused_pickle(tmp_path, name):
    ckpt, model, opt = _saved(tmp_path)
    marker = str(tmp_path / "PWNED")
    torch.save({"state": _Plant(marker)}, os.path.join(ckpt, name))
    with pytest.raises(CheckpointError, match="sha256 mismatch|truncated"):
        load_checkpoint(ckpt, model, opt)
    _rehash(ckpt, name, "state.json")
    with pytest.raises(CheckpointError, match="refusing to load it") as e:
        load_checkpoint(ckpt, model, opt)
    assert "\n" not in str(e.value) and not os.path.exists(marker)


@pytest.mark.parametrize("where", ["weight", "optimizer"])
def test_non_finite_checkpoint_is_refused(tmp_path, where):
    model, opt = _tiny()
    with torch.no_grad():
        if where == "weight":
            model.weight[0, 0] = float("nan")
        else:
            opt.state[model.bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match="NaN/Inf") as e:
        save_checkpoint(str(tmp_path), 1, model, opt, STATE)
    assert ("weight" if where == "weight" else "optimizer exp_avg_sq of bias") in str(e.value)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- run folder
def _fake(run, name, complete=True, marker="state.json"):
    os.makedirs(os.path.join(run, name))
    if complete:
        open(os.path.join(run, name, marker), "w").write("{}")


def test_prune_keeps_newest_complete_and_touches_nothing_else(tmp_path):
    run = str(tmp_path / "run")
    for i in range(1, 5):
        _fake(run, f"ckpt_{i:07d}", marker="state.json" if i % 2 else "manifest.json")
    _fake(run, "ckpt_0000005", complete=False)      # a newer folder without its manifest
    _fake(run, "ckpt_best")
    open(os.path.join(run, "notes.txt"), "w").write("mine")
    elsewhere = str(tmp_path / "elsewhere")
    _fake(str(tmp_path), "elsewhere/ckpt_0000000")
    os.symlink(os.path.join(elsewhere, "ckpt_0000000"), os.path.join(run, "ckpt_0000000"))
    assert prune_checkpoints(run, 0) == []
    gone = prune_checkpoints(run, 2)
    assert gone == [os.path.join(run, "ckpt_0000001"), os.path.join(run, "ckpt_0000002")]
    assert sorted(os.listdir(run)) == ["ckpt_0000000", "ckpt_0000003", "ckpt_0000004", "ckpt_0000005",
                                       "ckpt_best", "notes.txt"]
    assert os.path.isfile(os.path.join(elsewhere, "ckpt_0000000", "state.json"))
    assert prune_checkpoints(run, 2) == []


def test_remove_stale_partials(tmp_path):
    run = str(tmp_path)
    _fake(run, "ckpt_0000001")
    _fake(run, ".tmp_ckpt_0000003_123", complete=False)
    _fake(run, "ckpt_0000004.tmp", complete=False)
    _fake(run, "ckpt_0000001.old_5")                 # ckpt_0000001 exists: a leftover
    _fake(run, "ckpt_0000002.old_77")                # killed mid re-save: the only copy of step 2
    _fake(run, "ckpt_0000009.del")
    _fake(run, ".tmp_other", complete=False)
    removed = remove_stale_partials(run)
    assert sorted(os.path.basename(p) for p in removed) == [
        ".tmp_ckpt_0000003_123", "ckpt_0000001.old_5", "ckpt_0000004.tmp", "ckpt_0000009.del"]
    assert sorted(os.listdir(run)) == [".tmp_other", "ckpt_0000001", "ckpt_0000002"]
