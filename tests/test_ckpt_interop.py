"""Checkpoints every command reads (issue 16, item 4) and ``train.init_from`` (item 5).

- A real 2-rank run of ``python -m dsv3.train`` (ZeRO-1, sharded checkpoint, gloo): ``dsv3.checkpoint.hf export`` and
  ``dsv3.tools.generate`` read its run folder; the tokenizer is copied into it and ``corpus.json`` names it
  relative to the run folder.
- Resume across kinds, in fp64 on 2 gloo ranks with EP2: a one-process model + AdamW loads the sharded
  checkpoint, and the 2 ranks load a one-process checkpoint; each holds the source's weights, biases,
  moments and step bitwise, and its next step matches the source's own next step (bounds derived below).
  DualPipe PP2 on the same 2 ranks (both hold both stages) loads it bitwise on both copies.
- The sampler's state is the global position: a 2-rank sampler's state resumes a 1-rank sampler on the
  same global sequences.
- generate / export read only config.yaml's model section (older runs' removed keys do not matter).
- ``init_from`` from a run folder of either kind, a ckpt folder and a Hugging Face folder written by
  ``dsv3.checkpoint.hf export`` (fp32: the logits bitwise; bf16: the weights are exactly their bf16 roundings);
  bad paths, shape mismatches and an HF folder missing a tensor are one CheckpointError line.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import tiny_cfg
from tests.dist_utils import reference_step, run_ranks
from parallel.sim.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "dsv3")
U = 2.0 ** -53   # fp64 unit roundoff


# ------------------------------------------------------------------------ a real 2-rank run
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """runs/…: config.yaml, corpus.json, tokenizer/, ckpt_0000002 (DCP + manifest.json) of a 2-rank run."""
    out = str(tmp_path_factory.mktemp("sharded") / "run")
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="")
        for k in ("DSV3_FAULT", "DSV3_FAULT_RANK", "DSV3_FAULT_SIGNAL"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "dsv3.train", "configs/debug.yaml", "data.seq_len=16", "train.micro_batch_size=1",
               "train.steps=2", "train.warmup_steps=1", "train.sample_tokens=2", "train.eval_batches=1",
               "parallel.backend=gloo", "parallel.timeout_s=60", f"data.cache_dir={CACHE}", f"train.out_dir={out}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=300)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), errs
    assert os.path.isfile(os.path.join(out, "ckpt_0000002", "manifest.json")), os.listdir(out)
    return out


@pytest.fixture(scope="module")
def run_model(sharded_run):
    """The run's config, a model holding its latest checkpoint (read by load_any_checkpoint), the meta."""
    from dsv3.checkpoint.store import latest_checkpoint, load_any_checkpoint
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    cfg = load_config(os.path.join(sharded_run, "config.yaml"))
    model = Transformer(cfg.model).eval()
    meta = load_any_checkpoint(latest_checkpoint(sharded_run), model)
    return cfg, model, meta


@pytest.fixture(scope="module")
def hf_fp32(sharded_run, tmp_path_factory):
    """``python -m dsv3.checkpoint.hf export RUN OUT --dtype fp32`` of the sharded run."""
    from dsv3.checkpoint.hf import main as hf_main
    out = str(tmp_path_factory.mktemp("hf") / "fp32")
    assert hf_main(["export", sharded_run, out, "--dtype", "fp32"]) == 0
    return out


def test_tokenizer_is_copied_into_the_run_folder(sharded_run, tmp_path):
    from dsv3.checkpoint.hf import find_tokenizer_file
    from dsv3.errors import CheckpointError
    with open(os.path.join(sharded_run, "corpus.json")) as f:
        tok = json.load(f)["tokenizer"]
    assert tok["file"] == os.path.join("tokenizer", "tokenizer.json")
    copy = os.path.join(sharded_run, tok["file"])
    with open(copy, "rb") as f, open(tok["source"], "rb") as g:
        data = f.read()
        assert data == g.read() and hashlib.sha256(data).hexdigest() == tok["file_sha256"]
    assert find_tokenizer_file(sharded_run) == copy
    # the run folder moved elsewhere: the copy is still found; an old run's absolute source still read
    moved = tmp_path / "moved"
    shutil.copytree(sharded_run, moved, ignore=shutil.ignore_patterns("ckpt_*", "tensorboard"))
    assert find_tokenizer_file(str(moved)) == str(moved / tok["file"])
    manifest = json.loads((moved / "corpus.json").read_text())
    (moved / tok["file"]).write_bytes(data + b" ")
    with pytest.raises(CheckpointError) as e:
        find_tokenizer_file(str(moved))
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    shutil.rmtree(moved / "tokenizer")
    manifest["tokenizer"] = {k: v for k, v in manifest["tokenizer"].items() if k not in ("file", "file_sha256")}
    (moved / "corpus.json").write_text(json.dumps(manifest))
    assert find_tokenizer_file(str(moved)) == tok["source"]


def test_export_and_generate_read_a_sharded_run(sharded_run, run_model, hf_fp32, capsys):
    from dsv3.tools.generate import generate, main as generate_main
    from dsv3.checkpoint.hf import load_hf_checkpoint, load_tokenizer
    cfg, model, meta = run_model
    assert meta["kind"] == "sharded" and meta["step"] == 2
    back = load_hf_checkpoint(hf_fp32)
    ours = model.state_dict()
    for k, v in back.state_dict().items():
        if k in ours:
            assert torch.equal(v, ours[k]), k
    tok_file = os.path.join(sharded_run, "tokenizer", "tokenizer.json")
    with open(os.path.join(hf_fp32, "tokenizer.json"), "rb") as f, open(tok_file, "rb") as g:
        assert f.read() == g.read()
    tok = load_tokenizer(tok_file)
    prompt = tok.encode("def ")
    expected = tok.decode(prompt + generate(model, tok, prompt, 4))
    capsys.readouterr()
    assert generate_main(["--checkpoint", sharded_run, "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_a_run_config_with_removed_keys_still_reads(sharded_run, run_model, tmp_path):
    """generate / export read only config.yaml's model section: an older run's removed keys
    (train.grad_accum, parallel.num_chunks, model.linear_impl) do not make its checkpoints unreadable."""
    import yaml
    from dsv3.checkpoint.hf import run_model_config
    with open(os.path.join(sharded_run, "config.yaml")) as f:
        data = yaml.safe_load(f)
    data["model"]["linear_impl"] = "torch"
    data["train"]["grad_accum"] = 1
    data["parallel"]["num_chunks"] = 0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    assert run_model_config(str(tmp_path)) == run_model[0].model


# ------------------------------------------------------------- resume across kinds, 2 ranks EP2
EP2 = ["model.mtp.depth=1", "parallel.ep=2", "train.micro_batch_size=1"]
ROWS = 2


def _dualpipe_batch() -> list[str]:
    """4 micro-batches of 1 sequence where the config has ``train.global_batch`` (issue 16 item 3); older
    configs split micro_batch_size × grad_accum rows into the schedule's minimum of chunks."""
    import dataclasses
    from dsv3.config import TrainConfig
    if "global_batch" in {f.name for f in dataclasses.fields(TrainConfig)}:
        return ["train.micro_batch_size=1", "train.global_batch=4"]
    return []


def _model(seed: int):
    from dsv3.model.transformer import Transformer
    cfg = tiny_cfg(*EP2)
    torch.manual_seed(seed)
    model = Transformer(cfg.model).double()
    model.train()
    return cfg, model


def _batch(cfg):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.model.vocab_size, (ROWS, cfg.data.seq_len + 1), generator=g)


def _local(pm):   # numpy: sent back by value (a tensor would be an fd of a process about to exit)
    return {n: p.detach().numpy().copy() for n, p in pm.model.named_parameters()}


def _biases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}


def _ranks_worker(rank, world, sharded_dir, single_ckpt):
    from dsv3.model.transformer import Transformer
    from parallel.dist_checkpoint import load_sharded, save_sharded
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    out = {}
    # A: the sharded run: step 1, checkpoint, step 2
    cfg, model = _model(0)
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    rows = _batch(cfg)[pm.dp_index:pm.dp_index + 1]
    pm.train_step(rows, cfg.train.lr, model.mtp_weight)
    save_sharded(sharded_dir, 1, pm, dict(tokens=ROWS * cfg.data.seq_len, sampler={"epoch": 0, "index": ROWS}))
    out["a1"], out["a1_bias"] = _local(pm), {n: b.numpy() for n, b in _biases(model).items()}
    out["a2_loss"] = pm.train_step(rows, cfg.train.lr, model.mtp_weight)["loss"]
    out["a2"] = _local(pm)
    # B: a fresh (differently initialised) sharded model resumes the one-process checkpoint
    cfg, model = _model(5)
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    meta = load_sharded(single_ckpt, pm)
    out["b_meta"] = {k: meta[k] for k in ("kind", "step", "tokens", "sampler", "opt_step")}
    out["b1"], out["b1_bias"] = _local(pm), {n: b.numpy() for n, b in _biases(model).items()}
    out["b_opt_step"] = {float(st["step"]) for st in pm.zero.optimizer.state.values()}
    out["b2_loss"] = pm.train_step(rows, cfg.train.lr, model.mtp_weight)["loss"]
    out["b2"] = _local(pm)
    out["experts"] = sorted(pm.expert_names)
    # C: DualPipe PP2 (each rank holds both stages: mirrored copies) resumes the one-process checkpoint
    cfg = tiny_cfg("model.mtp.depth=1", "parallel.pp=2", "parallel.pp_schedule=dualpipe",
                   *_dualpipe_batch())   # DualPipe: an even number of >= 2·PP micro-batches
    torch.manual_seed(5)
    model = Transformer(cfg.model).double()
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    load_sharded(single_ckpt, pm)
    out["c"] = {n: [e.param.detach().numpy().copy()] + [pm.zero.optimizer.state[e.master][m][:e.param.numel()].numpy()
                                                         for m in ("exp_avg", "exp_avg_sq")]
                for n, e in pm.zero.entries.items() if e.world == 1}
    return out


def _full(results, key, experts):
    """Whole parameters from the 2 ranks' local ones (expert tensors: rank r holds experts block r)."""
    r0, r1 = results[0][key], results[1][key]
    return {n: torch.from_numpy(np.concatenate([r0[n], r1[n]]) if n in experts else r0[n]) for n in r0}


def _close_after_step(got: dict, want: dict, before: dict, rel: float) -> None:
    """Each tensor after one step within ``rel`` of that step's update size (‖w₂ − w₁‖)."""
    for n, w in want.items():
        moved = (w - before[n]).norm()
        assert (got[n] - w).norm() <= rel * moved + 1e-300, (n, float((got[n] - w).norm() / moved))


def test_resume_across_kinds_fp64_ep2(tmp_path):
    from dsv3.checkpoint.store import load_any_checkpoint, save_checkpoint
    from dsv3.training.optim import build_optimizer
    from parallel.dist_checkpoint import latest_sharded
    # the one-process run: step 1, checkpoint, step 2
    cfg, single = _model(0)
    opt = build_optimizer(single, cfg.train)
    batch = _batch(cfg)
    reference_step(single, opt, batch, cfg.train.grad_clip)
    s1 = {n: p.detach().clone() for n, p in single.named_parameters()}
    s1_bias = _biases(single)
    names = {id(p): n for n, p in single.named_parameters()}
    moments = {names[id(p)]: (st["exp_avg"].clone(), st["exp_avg_sq"].clone()) for p, st in opt.state.items()}
    ckpt = save_checkpoint(str(tmp_path / "single"), 1, single, opt,
                           dict(tokens=ROWS * cfg.data.seq_len, sampler={"epoch": 0, "index": ROWS}))
    s2_loss, _ = reference_step(single, opt, batch, cfg.train.grad_clip)
    s2 = {n: p.detach().clone() for n, p in single.named_parameters()}

    sharded_dir = str(tmp_path / "sharded")
    os.makedirs(sharded_dir)
    res = run_ranks(_ranks_worker, 2, sharded_dir, ckpt, timeout=240)
    experts = set(res[0]["experts"])
    assert experts and all(n.endswith(("experts.w1", "experts.w2", "experts.w3")) for n in experts)

    # the ranks hold the one-process checkpoint bitwise: weights, biases, AdamW step
    b1 = _full(res, "b1", experts)
    assert b1.keys() == s1.keys() and all(torch.equal(b1[n], s1[n]) for n in s1)
    assert all(torch.equal(torch.from_numpy(res[r]["b1_bias"][n]), s1_bias[n]) for r in (0, 1) for n in s1_bias)
    assert any(b.abs().sum() > 0 for b in s1_bias.values())
    assert res[0]["b_meta"] == dict(kind="single", step=1, tokens=ROWS * cfg.data.seq_len,
                                    sampler={"epoch": 0, "index": ROWS}, opt_step=1)
    assert res[0]["b_opt_step"] == {1.0}
    for r in (0, 1):   # DualPipe's mirrored stages: weights and moments bitwise on both copies
        assert res[r]["c"].keys() == s1.keys()
        for n, (w, m, v) in res[r]["c"].items():
            assert all(torch.equal(torch.from_numpy(a).reshape(b.shape), b) for a, b in
                       ((w, s1[n]), (m, moments[n][0]), (v, moments[n][1]))), (r, n)

    # one process holds the sharded checkpoint bitwise, and continues
    _, one = _model(5)
    opt1 = build_optimizer(one, cfg.train)
    meta = load_any_checkpoint(latest_sharded(sharded_dir), one, opt1)
    assert meta["kind"] == "sharded" and meta["step"] == 1 and meta["sampler"] == {"epoch": 0, "index": ROWS}
    a1 = _full(res, "a1", experts)
    assert all(torch.equal(p, a1[n]) for n, p in one.named_parameters())
    assert all(torch.equal(b, torch.from_numpy(res[0]["a1_bias"][n])) for n, b in _biases(one).items())
    assert {float(st["step"]) for st in opt1.state.values()} == {1.0} and len(opt1.state) == len(s1)
    o2_loss, _ = reference_step(one, opt1, batch, cfg.train.grad_clip)
    o2 = {n: p.detach().clone() for n, p in one.named_parameters()}

    # Next step from bitwise-equal state on the same 2 rows: the layouts differ only in the order of
    # sums (per-rank partial losses and gradients + all-reduce vs one process's sums over both rows,
    # experts' rows gathered by all-to-all). In fp64 a sum of n terms is off by at most
    # γ_n = n·u/(1 − n·u) of the sum of magnitudes. The loss is a mean of 2·32 positive per-token terms
    # (γ_64 ≈ 64u) after the forward, whose rows do not mix before the loss; 1e3·u relative leaves room
    # for a BLAS that rounds a 1-row GEMM differently from a 2-row one (measured: 0, bitwise).
    # Weights after AdamW: m̂/(√v̂+ε) carries the gradients' relative error (γ_n times the cancellation
    # of the backward sums), so ‖Δw‖ is that fraction of the update ‖w₂ − w₁‖: bounded by 1e-11
    # (≈ 10⁵·u; measured 1.9e-14).
    for got, want in ((o2_loss, res[0]["a2_loss"]), (res[0]["b2_loss"], s2_loss), (res[1]["b2_loss"], s2_loss)):
        assert abs(got - want) <= 1e3 * U * abs(want), (got, want)
    _close_after_step(o2, _full(res, "a2", experts), a1, 1e-11)
    _close_after_step(_full(res, "b2", experts), s2, s1, 1e-11)


def test_sampler_state_is_the_global_position():
    """A 2-rank sampler's state resumes a 1-rank one (and back) on the same global sequences, as
    long as the global batch per step (micro_batch_size × world) is the same."""
    from dsv3.data.dataset import Sampler
    tokens = np.arange(16 * 40 + 1, dtype=np.uint16)
    ranks = [Sampler(tokens, 16, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):   # crosses an epoch boundary (40 sequences, 2 per step)
        for s in ranks:
            s.next_batch()
    for _ in range(15):
        for s in ranks:
            s.next_batch()
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["epoch"] == 1
    one = Sampler(tokens, 16, 2, seed=3)
    one.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(one.next_batch(), torch.cat([s.next_batch() for s in ranks]))
    back = [Sampler(tokens, 16, 1, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in back:
        s.load_state_dict(one.state_dict())
    assert torch.equal(torch.cat([s.next_batch() for s in back]), one.next_batch())


# ------------------------------------------------------------------------------- init_from
def test_init_from_hf_export_reproduces_the_logits(sharded_run, run_model, hf_fp32, tmp_path, capsys):
    from dsv3.checkpoint.hf import main as hf_main
    from dsv3.checkpoint.init_from import init_from
    from dsv3.model.transformer import Transformer
    cfg, model, _ = run_model
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    bf16 = str(tmp_path / "bf16")
    assert hf_main(["export", sharded_run, bf16]) == 0, capsys.readouterr().err   # BF16, the default
    for out in (hf_fp32, bf16):
        fresh = Transformer(cfg.model).eval()
        assert init_from(out, fresh) == dict(kind="hf", checkpoint=out, step=None)
        got = fresh.state_dict()
        for k, v in model.state_dict().items():   # fp32: the weights; bf16: their roundings (biases FP32)
            want = v if out == hf_fp32 or k.endswith("e_score_correction_bias") else v.bfloat16().float()
            assert torch.equal(got[k], want), (out, k)
    with torch.no_grad():   # the fp32 export's weights and biases are the run's: the logits bit for bit
        fresh = Transformer(cfg.model).eval()
        init_from(hf_fp32, fresh)
        assert torch.equal(fresh(tokens), model(tokens))
    assert any(b.abs().sum() > 0 for b in _biases(model).values())   # biases moved in training, and came along


def test_init_from_run_and_ckpt_folders(sharded_run, run_model, tmp_path):
    from dsv3.checkpoint.store import save_checkpoint
    from dsv3.checkpoint.init_from import init_from
    from dsv3.model.transformer import Transformer
    from dsv3.training.optim import build_optimizer
    cfg, model, _ = run_model
    single_run = str(tmp_path / "single")
    ckpt = save_checkpoint(single_run, 7, model, build_optimizer(model, cfg.train), dict(tokens=0, sampler={}))
    older = Transformer(cfg.model)
    save_checkpoint(single_run, 3, older, build_optimizer(older, cfg.train), dict(tokens=0, sampler={}))
    sharded = os.path.join(sharded_run, "ckpt_0000002")
    for path, want in ((sharded_run, dict(kind="sharded", checkpoint=sharded, step=2)),
                       (single_run, dict(kind="single", checkpoint=ckpt, step=7)),   # the latest, not the last written
                       (ckpt, dict(kind="single", checkpoint=ckpt, step=7))):
        fresh = Transformer(cfg.model)
        assert init_from(path, fresh) == want
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


def _one_line_error(path, model, *fragments):
    from dsv3.errors import CheckpointError
    from dsv3.checkpoint.init_from import init_from
    with pytest.raises(CheckpointError) as e:
        init_from(path, model)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_init_from_errors_are_one_line(sharded_run, hf_fp32, tmp_path):
    from safetensors.torch import load_file, save_file
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    cfg = load_config(os.path.join(sharded_run, "config.yaml"))
    model = Transformer(cfg.model)
    _one_line_error(str(tmp_path / "nowhere"), model, "nowhere", "no such file")
    (tmp_path / "afile").write_text("x")
    _one_line_error(str(tmp_path / "afile"), model, "expected a folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(str(tmp_path / "empty"), model, "not a dsv3 run folder")
    (tmp_path / "norun").mkdir()
    (tmp_path / "norun" / "config.yaml").write_text("{}")
    _one_line_error(str(tmp_path / "norun"), model, "no complete checkpoint")
    wider = Transformer(load_config(os.path.join(sharded_run, "config.yaml"), ["model.dim=48"]).model)
    _one_line_error(sharded_run, wider, "embed.weight", "elements")
    no_mtp = Transformer(load_config(os.path.join(sharded_run, "config.yaml"), ["model.mtp.depth=0"]).model)
    _one_line_error(sharded_run, no_mtp, "unknown tensor 'mtp.")
    _one_line_error(hf_fp32, wider, "embed.weight", "shape")
    _one_line_error(hf_fp32, no_mtp, "MTP layer", "model.mtp.depth=1")
    out = tmp_path / "hf"
    shutil.copytree(hf_fp32, out)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    _one_line_error(str(out), model, "model.layers.2.mlp.experts.3.up_proj.weight", "missing")
