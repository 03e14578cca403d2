"""The debug dsv3 model (MLA, MoE with bias update and sequence-wise balance loss, MTP) through every
pipeline schedule against one process on the same micro-batches (report §3.2.1, DualPipe's own criterion):
per-micro-batch losses lm + λ·mtp bitwise equal in fp32; in fp64 every gradient (mirror copies summed)
‖x−y‖²/(‖x‖²+‖y‖²) < 1e-13, the routing biases after the aux-loss-free update bitwise equal, and a second
step from the updated weights agreeing as closely. One 4-rank gloo group runs 1F1B, ZB1P and DualPipe on
4 ranks and DualPipeV on ranks {0, 1}; each rank scores itself against the saved reference."""
from __future__ import annotations

import torch

from tests.conftest import config_path
from tests.dist_utils import run_ranks

WORLD, C, B, SEQ, LR = 4, 8, 2, 16, 0.05
OVERRIDES = [f"data.seq_len={SEQ}"]
KINDS = (("1f1b", 4), ("zb1p", 4), ("dualpipe", 4), ("dualpipev", 2))


def _setup(dtype):
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    cfg = load_config(config_path("debug.yaml"), OVERRIDES)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dtype)
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (C * B, SEQ + 1), generator=g)
    return cfg, model, batch


def _reference(path):
    """One process: each micro-batch's lm + λ·mtp, grads summed over micro-batches, SGD, bias update; twice."""
    from parallel.dsv3_stages import dsv3_microbatches
    ref = {}
    for dtype, steps in ((torch.float32, 1), (torch.float64, 2)):
        cfg, model, batch = _setup(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(steps):
            losses = []
            for mb in dsv3_microbatches(batch, C):
                out = model(mb["tokens"], labels=mb["labels"])
                out.loss.backward()
                losses.append((out.lm_loss + model.mtp_weight * out.mtp_loss).detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_bias()
            bias = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
            ref[(str(dtype), step)] = dict(losses=losses, grads=grads, bias=bias)
    torch.save(ref, path)


def _rel(x, y):
    x, y = x.double(), y.double()
    return ((x - y).square().sum() / (x.square().sum() + y.square().sum())).item()


def _worker(rank, world, ref_path):
    import torch.distributed as dist
    from parallel.dsv3_stages import dsv3_microbatches, dsv3_stages, moe_by_name, update_bias_pipelined
    from parallel.pipeline import Pipeline
    from parallel.schedules import layout
    ref = torch.load(ref_path)
    out = {}
    for kind, n in KINDS:
        if rank >= n:
            continue
        group = dist.new_group(list(range(n)), use_local_synchronization=True) if n < world else None
        for dtype, steps in ((torch.float32, 1), (torch.float64, 2)):
            cfg, model, batch = _setup(dtype)
            mbs = dsv3_microbatches(batch, C)
            pipe = Pipeline(model, dsv3_stages(model, layout(kind, n).num_model_stages), kind, C,
                            act_shape=(B, SEQ, cfg.model.dim), act_dtype=dtype, group=group, recv_timeout=60)
            opt = torch.optim.SGD(pipe.parameters(), lr=LR)
            for step in range(steps):
                expect = ref[(str(dtype), step)]
                losses = pipe.step(mbs)
                pipe.sync_grads()
                res = dict(bitwise=[m for m, l in enumerate(losses) if l is not None and torch.equal(l, expect["losses"][m])],
                           loss_rel=[abs(l.item() / expect["losses"][m].item() - 1) for m, l in enumerate(losses) if l is not None],
                           grad_rel={name: _rel(p.grad, expect["grads"][name]) for name, p in pipe.params.items()})
                opt.step()
                opt.zero_grad(set_to_none=True)
                loads = update_bias_pipelined(pipe)
                res["bias_equal"] = {name: torch.equal(moe.gate.e_score_correction_bias, expect["bias"][f"{name}.gate.e_score_correction_bias"])
                                     for name, moe in moe_by_name(pipe).items()}
                res["tokens"] = int(sum(load.sum() for load in loads.values()))
                out[(kind, str(dtype), step)] = res
    return out


def test_dsv3_pipeline_matches_single_process(tmp_path):
    ref_path = str(tmp_path / "ref.pt")
    _reference(ref_path)
    ref = torch.load(ref_path)
    results = run_ranks(_worker, WORLD, ref_path, timeout=240)
    cfg = _setup(torch.float32)[0]
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers + cfg.model.mtp.depth
    all_names = set(ref[(str(torch.float64), 0)]["grads"])
    for kind, n in KINDS:
        for dtype, steps in ((torch.float32, 1), (torch.float64, 2)):
            for step in range(steps):
                key = (kind, str(dtype), step)
                res = [results[r][key] for r in range(n)]
                bitwise = sorted(m for r in res for m in r["bitwise"])
                rels = [x for r in res for x in r["loss_rel"]]
                assert len(rels) == C, (key, rels)            # each micro-batch's loss on exactly one rank
                if dtype == torch.float32 and step == 0:      # same ops on the same bits
                    assert bitwise == list(range(C)), (key, bitwise, rels)
                else:
                    assert max(rels) < 1e-12, (key, rels)
                if dtype == torch.float64:
                    names = set().union(*(r["grad_rel"] for r in res))
                    assert names == all_names, (key, all_names ^ names)
                    worst = max((v, name) for r in res for name, v in r["grad_rel"].items())
                    assert worst[0] < 1e-13, (key, worst)
                    biases = {name: ok for r in res for name, ok in r["bias_equal"].items()}
                    assert len(biases) == n_moe and all(biases.values()), (key, biases)
                    # every routed token counted once per MoE layer: C·B·T tokens × top-k, over the copies
                    k = cfg.model.moe.n_activated_experts
                    copies = 2 if kind == "dualpipe" else 1
                    assert sum(r["tokens"] for r in res) == copies * n_moe * C * B * SEQ * k, (key, res[0]["tokens"])
