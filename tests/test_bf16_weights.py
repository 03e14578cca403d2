"""BF16 compute weights under ZeRO-1 (``train.weights_dtype=bf16``; report §3.3 mixed precision, issue 17 C):
BF16 parameters, FP32 main-grad buffers that every micro-batch's BF16 gradient is added into, the FP32
master shard stepped by AdamW and rounded back into the BF16 parameters; pipeline P2P in BF16.

The distributed run is compared with a one-process reference written out by hand, computed in the same
process (same kernels, same thread count): every operation is the same elementwise FP32 / BF16 op on the
same values, and a sum of two ranks' FP32 partials is commutative, so the results are equal bitwise.
Clipping is switched off (``grad_clip`` huge: the coefficient is exactly 1) because the global norm is
summed in a different order over shards than over whole tensors (its own test: the FP32 ZeRO suite)."""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from tests.conftest import config_path
from tests.dist_utils import run_ranks

SEQ, ROWS, STEPS = 8, 4, 2
BASE = [f"data.seq_len={SEQ}", "train.micro_batch_size=1", f"train.global_batch={ROWS}", "train.dtype=bf16",
        "train.weights_dtype=bf16", "train.grad_clip=1e30", "train.lr=1e-2", "model.n_layers=2", "model.vocab_size=512"]
RUNS = {"dp2": ["parallel.zero1=true"], "pp2": ["parallel.pp=2", "parallel.pp_schedule=1f1b"]}


def _setup(overrides):
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    cfg = load_config(config_path("debug.yaml"), BASE + overrides)
    model = Transformer(cfg.model, seed=3)
    model.train()
    batch = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return cfg, model, batch


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _reference(cfg, model, batch, dp: int):
    """By hand: BF16 weights = rounded FP32 init; per DP replica the micro-batches' BF16 grads summed in
    FP32; the replicas' sums added; ÷ micro-batches; AdamW on the FP32 master; rounded back to BF16."""
    from dsv3.training.optim import AdamW
    from parallel.dsv3_stages import dsv3_microbatches
    t = cfg.train
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    master = {n: nn.Parameter(p.detach().float().clone()) for n, p in params.items()}
    for p in params.values():
        p.data = p.data.to(torch.bfloat16)
    opt = AdamW([dict(params=[m for n, m in master.items() if m.ndim >= 2], weight_decay=t.weight_decay),
                 dict(params=[m for n, m in master.items() if m.ndim < 2], weight_decay=0.0)],
                lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    model.set_aux_loss_scale(1.0)
    rows, C = ROWS // dp, ROWS // dp // t.micro_batch_size
    losses = []
    for _ in range(STEPS):
        total, loss, balance = None, 0.0, 0.0
        for r in range(dp):
            acc = {n: torch.zeros(p.shape) for n, p in params.items()}
            part, part_balance = 0.0, 0.0
            for mb in dsv3_microbatches(batch[r * rows:(r + 1) * rows], C):
                with _autocast():
                    out = model(mb["tokens"], labels=mb["labels"])
                out.loss.backward()
                part += float(out.lm_loss + model.mtp_weight * out.mtp_loss)   # the trainer's float64 sums
                part_balance += float(out.balance_loss)
                for n, p in params.items():
                    acc[n] += p.grad   # FP32 += BF16
                    p.grad = None
            total = acc if total is None else {n: total[n] + acc[n] for n in acc}
            loss, balance = loss + part, balance + part_balance
        for n, m in master.items():
            m.grad = total[n] / (C * dp)
        opt.step()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(master[n])
        model.update_bias()   # this model routed every replica's tokens: its loads are the summed ones
        losses.append(loss / (C * dp) + balance / (C * dp))
    return losses, {n: p.detach().clone() for n, p in params.items()}, {n: m.detach().clone() for n, m in master.items()}


def _worker(rank, world, ckpt_dir):
    return {name: _run(rank, overrides, ckpt_dir if name == "dp2" else None) for name, overrides in RUNS.items()}


def _run(rank, overrides, ckpt_dir=None):
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    cfg, model, batch = _setup(overrides)
    mesh = Mesh.from_config(cfg.parallel)
    pm = parallelize(model, mesh, cfg)
    rows = ROWS // mesh.dp
    stats = [pm.train_step(batch[pm.dp_index * rows:(pm.dp_index + 1) * rows], cfg.train.lr, model.mtp_weight,
                           autocast=_autocast) for _ in range(STEPS)]
    out = dict(losses=[s["loss"] for s in stats],
               dtypes={p.dtype for p in pm.params.values()},
               main_grads_zero=all(not p.main_grad.any() and p.grad is None for p in pm.params.values()),
               act_dtype=pm.pipe.act_dtype if pm.pipe is not None else None)
    if pm.pipe is None:
        out["params"] = {n: p.detach().clone() for n, p in pm.params.items()}
        out["master"] = {n: (e.index, e.chunk, e.master.detach().clone()) for n, e in pm.zero.entries.items()}
    if ckpt_dir is not None:   # a sharded checkpoint of the FP32 masters, loaded into a fresh BF16 run
        from parallel.dist_checkpoint import latest_sharded, load_sharded, save_sharded
        save_sharded(ckpt_dir, STEPS, pm, dict(tokens=0, sampler={"epoch": 0, "index": 0}))
        cfg2, model2, _ = _setup(overrides)
        pm2 = parallelize(model2, Mesh.from_config(cfg2.parallel), cfg2)
        load_sharded(latest_sharded(ckpt_dir), pm2)
        out["reloaded"] = all(torch.equal(pm2.params[n], p) and p.dtype == torch.bfloat16 for n, p in pm.params.items()) \
            and all(torch.equal(pm2.zero.entries[n].master, e.master) and all(torch.equal(
                pm2.zero.optimizer.state[pm2.zero.entries[n].master][m], pm.zero.optimizer.state[e.master][m])
                for m in ("exp_avg", "exp_avg_sq")) for n, e in pm.zero.entries.items())
    if rank == 0:   # the reference in this process: the same kernels and thread count as the run above
        ref_cfg, ref_model, _ = _setup(overrides)
        out["ref"] = _reference(ref_cfg, ref_model, batch, mesh.dp)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both layouts in one pair of gloo processes (one start-up)."""
    res = run_ranks(_worker, 2, str(tmp_path_factory.mktemp("ckpt")), timeout=240)
    return {name: [r[name] for r in res] for name in RUNS}


def test_zero1_bf16_weights_equal_the_hand_written_reference(runs):
    """DP 2 on 2 gloo ranks, 2 steps of 2 micro-batches each: every BF16 parameter and every FP32 master
    shard equal the reference bitwise, on both ranks; the main grads are zeroed after the step; a sharded
    checkpoint (FP32 masters and moments) loaded into a fresh run gives the same masters, moments and BF16
    parameters bitwise."""
    res = runs["dp2"]
    ref_losses, ref_params, ref_master = res[0]["ref"]
    for r in res:
        assert r["dtypes"] == {torch.bfloat16} and r["main_grads_zero"] and r["reloaded"]
        for n, p in r["params"].items():
            assert torch.equal(p, ref_params[n]), n
        for n, (i, c, shard) in r["master"].items():
            flat = ref_master[n].reshape(-1)[i * c:(i + 1) * c]
            assert torch.equal(shard[:flat.numel()], flat), n
        # the logged loss: the same FP32 per-micro-batch parts summed in float64 in the same order
        for a, b in zip(r["losses"], ref_losses):
            assert abs(a - b) <= 1e-12 * abs(b)
    # the weights moved, and a BF16 rounding of the master is what the parameters hold
    name = next(n for n, p in ref_params.items() if p.ndim >= 2)
    assert torch.equal(ref_params[name], ref_master[name].to(torch.bfloat16))
    assert not torch.equal(ref_master[name], ref_master[name].to(torch.bfloat16).float())


def test_pipeline_sends_bf16_and_starts_from_the_same_loss(runs):
    """PP 2 (1F1B): the P2P activations and gradients are BF16 (the pipeline refuses a tensor of another
    dtype), and the first step — identical BF16 weights, the same ops per micro-batch — gives the
    reference's loss (float64 sums of the same FP32 per-micro-batch losses)."""
    res = runs["pp2"]
    ref_losses = res[0]["ref"][0]
    for r in res:
        assert r["act_dtype"] == torch.bfloat16 and r["dtypes"] == {torch.bfloat16} and r["main_grads_zero"]
        assert abs(r["losses"][0] - ref_losses[0]) <= 1e-12 * ref_losses[0]
        assert math.isfinite(r["losses"][1]) and r["losses"][1] < r["losses"][0]


def test_main_grad_accumulates_bf16_grads_in_fp32():
    """One rank (no process group): four micro-batches' BF16 gradients land in the FP32 main grad, equal
    to their FP32 sum; ``.grad`` is freed after each; a BF16 running sum would differ."""
    from dsv3.config import TrainConfig
    from parallel.zero import Zero1
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    z = Zero1({"w": lin.weight}, {"dense": (None, 1, 0), "expert": (None, 1, 0)}, TrainConfig(weights_dtype="bf16"),
              expert_names=set(), ready_after={"w": None}, copies={"w": (None, 1)})
    assert lin.weight.dtype == torch.bfloat16 and z.entries["w"].master.dtype == torch.float32
    grads, bf16_sum = [], torch.zeros(64, 64, dtype=torch.bfloat16)
    for k in range(4):
        x = torch.randn(16, 64, dtype=torch.bfloat16) * (10.0 ** k)   # magnitudes apart: BF16 sums lose bits
        g, = torch.autograd.grad(lin(x).square().sum(), lin.weight)
        grads.append(g)
        bf16_sum += g
        lin(x).square().sum().backward()
        assert lin.weight.grad is None
    fp32_sum = sum(g.float() for g in grads)
    assert torch.equal(lin.weight.main_grad, fp32_sum)
    assert not torch.equal(bf16_sum.float(), fp32_sum)


def test_deferred_weight_grads_accumulate_in_fp32_main_grad():
    """The zero-bubble W step (``parallel.weight_grad``, DualPipe / ZB1P) with BF16 weights under ZeRO-1:
    four micro-batches' B run first, then their W in order; each weight's FP32 main grad must equal the
    FP32 sum, in the same order, of the BF16 pieces a plain backward of each micro-batch gives (the same
    matmuls on the same operands: equal bitwise), ``.grad`` stays empty. The bound that tells it from a
    BF16 sum: an FP32 sum of K pieces is within (K−1)·2⁻²⁴·Σ|g_k| of the exact (fp64) sum; a BF16 running
    sum is not (its additions round at 2⁻⁸), with inputs whose magnitudes lie far apart."""
    from dsv3.config import TrainConfig
    from parallel.weight_grad import backward_input
    from parallel.zero import Zero1
    torch.manual_seed(0)
    stage = nn.Sequential(nn.Linear(32, 48, bias=False), nn.Tanh(), nn.Linear(48, 32, bias=False))
    named = {n: p for n, p in stage.named_parameters()}
    Zero1(named, {"dense": (None, 1, 0), "expert": (None, 1, 0)}, TrainConfig(weights_dtype="bf16"),
          expert_names=set(), ready_after={n: None for n in named}, copies={n: (None, 1) for n in named})
    assert {p.dtype for p in named.values()} == {torch.bfloat16}
    xs = [(torch.randn(16, 32) * 10.0 ** (k - 1)).to(torch.bfloat16) for k in range(4)]
    pieces = []
    for x in xs:   # the reference pieces: a plain backward of each micro-batch
        pieces.append(torch.autograd.grad(stage(x).float().square().sum(), list(named.values())))
    weights = []
    for x in xs:   # B of every micro-batch, then their W (deferred, as a zero-bubble schedule runs them)
        x = x.clone().requires_grad_()
        _, w = backward_input([stage(x).float().square().sum()], [None], [x], list(named.values()))
        weights.append(w)
    for w in weights:
        w()
    K = len(xs)
    for i, (n, p) in enumerate(named.items()):
        assert p.grad is None, n
        g = [pc[i] for pc in pieces]
        assert all(t.dtype == torch.bfloat16 for t in g)
        fp32_sum = torch.zeros(p.shape)
        bf16_sum = torch.zeros(p.shape, dtype=torch.bfloat16)
        for t in g:
            fp32_sum += t
            bf16_sum += t
        assert torch.equal(p.main_grad, fp32_sum), n
        exact = sum(t.double() for t in g)
        bound = (K - 1) * 2.0 ** -24 * sum(t.double().abs() for t in g)
        assert ((p.main_grad.double() - exact).abs() <= bound).all(), n
        assert ((bf16_sum.double() - exact).abs() > bound).any(), n


def test_bf16_weights_need_bf16_autocast():
    from dsv3.config import ConfigError, load_config
    from parallel.parallelize import ParallelModel
    cfg = load_config(config_path("debug.yaml"), ["train.dtype=fp32", "train.weights_dtype=bf16"])
    mesh = types.SimpleNamespace(dp=1)   # refused before any group or model is touched
    with pytest.raises(ConfigError, match="train.weights_dtype=bf16 needs BF16 autocast"):
        ParallelModel(None, mesh, cfg, torch.device("cpu"))


def test_one_process_run_refuses_bf16_weights(capsys, tmp_path):
    """BF16 weights live in ZeRO-1: a one-process run without ``parallel.force`` says so (exit 2, one line)."""
    from tests.test_bad_config_table import assert_clean_error, data_args, make_corpus, run_main
    corpus = make_corpus(tmp_path / "corpus")
    code, err = run_main(capsys, data_args(tmp_path, corpus, "train.weights_dtype=bf16", "train.dtype=bf16"))
    assert_clean_error(code, err, "train.weights_dtype=bf16 needs the ZeRO-1 path")
