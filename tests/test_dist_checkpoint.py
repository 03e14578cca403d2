"""Sharded checkpoints reshard: 8 gloo ranks train 2 steps on PP2 × DP4 with EP4 (DualPipe) and save;
the same processes resume on PP1 × DP8 with EP4, and one process resumes from the same folder; both
continue 2 steps with losses within 1e-5 relative of an uninterrupted one-process run. The checkpoint
also exports to the Hugging Face layout with the trained weights."""
from __future__ import annotations

import os

import torch

from tests.dist_utils import reference_step, run_ranks
from tests.test_parallelize import GLOBAL_ROWS, RUNS, _setup

STEPS = 4   # 2 before the checkpoint, 2 after


def _reference():
    from dsv3.optim import build_optimizer
    cfg, model, batches = _setup([])
    batches = batches[:1] * STEPS
    opt = build_optimizer(model, cfg.train)
    losses, weights = [], None
    for i, b in enumerate(batches):
        losses.append(reference_step(model, opt, b, cfg.train.grad_clip)[0])
        if i == 1:
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return losses, weights


def _worker(rank, world, ckpt_dir):
    from parallel.dist_checkpoint import latest_sharded, load_sharded, save_sharded
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    losses = {}
    for phase, name in (("save", "pp2_dp4_ep4_dualpipe"), ("resume", "pp1_dp8_ep4")):
        cfg, model, batches = _setup(RUNS[name])
        mesh = Mesh.from_config(cfg.parallel)
        pm = parallelize(model, mesh, cfg)
        rows = GLOBAL_ROWS // mesh.dp
        mine = batches[0][pm.dp_index * rows:(pm.dp_index + 1) * rows]
        if phase == "resume":
            meta = load_sharded(latest_sharded(ckpt_dir), pm)
            assert meta["step"] == 2 and meta["tokens"] == 123
            if rank == 0:   # the dense weights as resumed (experts are sharded on this layout)
                losses["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if n not in pm.expert_names}
        losses[phase] = [pm.train_step(mine, cfg.train.lr, model.mtp_weight)["loss"] for _ in range(2)]
        if phase == "save":
            save_sharded(ckpt_dir, 2, pm, dict(tokens=123, sampler={"epoch": 0, "index": 32}))
    return losses


def test_save_pp2_dp4_resume_dp8_and_one_process(tmp_path):
    from dsv3.optim import build_optimizer
    from parallel.dist_checkpoint import export_hf, latest_sharded, load_sharded_into_model
    ref_losses, ref_weights = _reference()
    ckpt_dir = str(tmp_path / "run")
    os.makedirs(ckpt_dir)
    results = run_ranks(_worker, 8, ckpt_dir, timeout=400)
    path = latest_sharded(ckpt_dir)
    assert path and path.endswith("ckpt_0000002") and not os.path.exists(path + ".tmp")
    for r in results:
        for a, b in zip(r["save"] + r["resume"], ref_losses, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (r, ref_losses)

    cfg, model, batches = _setup([])
    opt = build_optimizer(model, cfg.train)
    meta = load_sharded_into_model(path, model, opt)
    assert meta["sampler"] == {"epoch": 0, "index": 32}
    resumed = results[0]["weights"]
    assert len(resumed) > 20
    init = dict(_setup([])[1].named_parameters())
    for n, p in model.named_parameters():   # both layouts read the same saved FP32 masters
        if n in resumed:
            assert torch.equal(p, resumed[n]), n
        # and those are the trained weights: within 1% of the two steps' displacement from the initial
        # weights (not exactly: AdamW's first steps turn reduction-order rounding of tiny gradients into
        # up to ±lr moves of single elements)
        moved = (ref_weights[n] - init[n]).norm()
        assert moved > 0 and (p - ref_weights[n]).norm() <= 0.01 * moved, (n, (p - ref_weights[n]).norm() / moved)
    for i in range(2):
        loss, _ = reference_step(model, opt, batches[0], cfg.train.grad_clip)
        assert abs(loss - ref_losses[2 + i]) <= 1e-5 * ref_losses[2 + i], (i, loss, ref_losses)

    from dsv3.hf import load_hf_checkpoint
    _, fresh, _ = _setup([])
    export_hf(path, fresh, str(tmp_path / "hf"))
    back = load_hf_checkpoint(str(tmp_path / "hf"))
    w = ref_weights["layers.1.ffn.experts.w1"]
    got = dict(back.named_parameters())["layers.1.ffn.experts.w1"]
    assert torch.allclose(got, w, rtol=1e-2, atol=1e-4)     # stored in BF16
