"""The pipeline executor against a single-process run (report §3.2.1; DualPipe's own test's criterion):
per-micro-batch losses bitwise equal in fp32, every gradient with ‖x−y‖²/(‖x‖²+‖y‖²) < 1e-13 in fp64
(copies summed first), copies bitwise equal after each step, and a second step agreeing too."""
import multiprocessing as mp
import os
import re
import socket
import time
from datetime import timedelta

import pytest
import torch

from parallel.schedules import layout
from parallel.sim.toy_stages import ToyLM, toy_microbatches, toy_stages
from parallel.weight_grad import backward_input

B, T, VOCAB, DIM, LAYERS = 2, 5, 32, 16, 8
LR = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(dtype):
    torch.manual_seed(1234)
    return ToyLM(VOCAB, DIM, LAYERS).to(dtype)


def _worker(rank, world, port, kind, C, out_dir, die_rank):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from parallel.pipeline import Pipeline
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    calls = _ignore_tags(dist)
    try:
        result = {"p2p_calls": calls}
        mbs = toy_microbatches(C, B, T, VOCAB)
        for dtype in (torch.float32, torch.float64):
            model = _model(dtype)
            stages = toy_stages(model, layout(kind, world).num_model_stages)
            pipe = Pipeline(model, stages, kind, C, act_shape=(B, T, DIM), act_dtype=dtype, recv_timeout=20)
            opt = torch.optim.SGD(pipe.parameters(), lr=LR)
            if rank == die_rank:
                os._exit(3)  # a dead rank: its peers must fail within the timeout, not hang
            for step in range(2):
                losses = pipe.step(mbs)
                pipe.sync_grads()
                result[(str(dtype), step)] = {
                    "losses": {m: l for m, l in enumerate(losses) if l is not None},
                    "grads": {n: p.grad.clone() for n, p in pipe.params.items()}}
                opt.step()
                opt.zero_grad(set_to_none=True)
                result[(str(dtype), step)]["params"] = {n: p.detach().clone() for n, p in pipe.params.items()}
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    except Exception as e:  # reported to the parent, which checks the failure named the dead peer
        torch.save({"error": repr(e)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ignore_tags(dist) -> dict:
    """NCCL ignores P2P tags: every point-to-point entry point of torch.distributed is patched to tag 0,
    so gloo matches a pair's messages by posting order as NCCL does. Returns the call counts."""
    calls = {}

    def wrap(name):
        orig = getattr(dist, name)

        def patched(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            kw.pop("tag", None)
            return orig(*args, **kw, tag=0)
        setattr(dist, name, patched)
    for name in ("isend", "irecv", "send", "recv"):
        wrap(name)
    orig_op = dist.P2POp

    def p2pop(op, tensor, peer=None, group=None, tag=0, **kw):
        calls["P2POp"] = calls.get("P2POp", 0) + 1
        return orig_op(op, tensor, peer, group, 0, **kw)
    dist.P2POp = p2pop
    return calls


def _spawn(kind, world, C, tmp_path, die_rank=-1, timeout=150):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, kind, C, str(tmp_path), die_rank)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{kind}: {len(alive)} rank(s) still running after {timeout}s"
    return [torch.load(tmp_path / f"{r}.pt") if (tmp_path / f"{r}.pt").exists() else None for r in range(world)]


def _reference(C):
    """Single process, same micro-batches: per-micro-batch losses, summed grads, SGD, twice."""
    mbs = toy_microbatches(C, B, T, VOCAB)
    ref = {}
    for dtype in (torch.float32, torch.float64):
        model = _model(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(2):
            losses = []
            for mb in mbs:
                loss = model(mb)
                loss.backward()
                losses.append(loss.detach())
            ref[(str(dtype), step)] = {"losses": losses,
                                       "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
            opt.step()
            opt.zero_grad(set_to_none=True)
    return ref


def _rel(x, y):
    x, y = x.double(), y.double()
    return ((x - y).square().sum() / (x.square().sum() + y.square().sum())).item()


# DualPipe PP8 and DualPipeV PP4: the layouts where a pair's messages are needed in another order than sent
# (every message has one tag, as under NCCL, which ignores tags: they must match by order)
@pytest.mark.parametrize("kind,world,C", [("1f1b", 4, 6), ("zb1p", 4, 6), ("dualpipe", 4, 8), ("dualpipev", 2, 5),
                                          ("dualpipe", 8, 16), ("dualpipev", 4, 8)])
def test_pipeline_matches_single_process(kind, world, C, tmp_path):
    results = _spawn(kind, world, C, tmp_path)
    for r, res in enumerate(results):
        assert res is not None and "error" not in res, f"rank {r}: {res}"
        assert res.pop("p2p_calls").get("isend", 0) > 0, f"rank {r}: the tag-ignoring isend was never called"
    ref = _reference(C)
    for key, expect in ref.items():
        dtype, step = key
        losses = {}
        for res in results:
            losses.update(res[key]["losses"])
        assert sorted(losses) == list(range(C))
        if dtype == str(torch.float32) and step == 0:
            for m in range(C):  # same ops on the same bits: bitwise
                assert torch.equal(losses[m], expect["losses"][m]), (m, losses[m].item(), expect["losses"][m].item())
        if dtype == str(torch.float64):
            for m in range(C):
                assert abs(losses[m].item() - expect["losses"][m].item()) <= 1e-12 * abs(expect["losses"][m].item())
            names = set().union(*(res[key]["grads"] for res in results))
            assert names == set(expect["grads"])
            for n in names:
                copies = [res[key]["grads"][n] for res in results if n in res[key]["grads"]]
                for c in copies[1:]:
                    assert torch.equal(c, copies[0]), f"{n}: copies' summed grads differ"
                assert _rel(copies[0], expect["grads"][n]) < 1e-13, (n, _rel(copies[0], expect["grads"][n]))
        for n in set().union(*(res[key]["params"] for res in results)):  # copies stay bitwise equal
            copies = [res[key]["params"][n] for res in results if n in res[key]["params"]]
            assert all(torch.equal(c, copies[0]) for c in copies), f"{kind} step {step}: copies of {n} diverged"
    if kind == "dualpipe":  # every stage exists twice: rank r and N−1−r each hold the embedding
        assert sum("embed.weight" in res[(str(torch.float64), 0)]["grads"] for res in results) == 2


def test_dead_rank_fails_fast(tmp_path):
    """Rank 1 exits mid-run: rank 0 leaves its step by the pipeline's transfer error, a PeerError naming
    rank 1 (a receive from it fails on the closed connection or after the 20 s receive timeout), and
    exits. A survivor that hangs instead is still running at the harness's deadline, which only bounds a
    hang (8× the receive timeout: load cannot reach it); nothing here is timed."""
    results = _spawn("1f1b", 2, 2, tmp_path, die_rank=1, timeout=160)
    assert results[1] is None                          # the dead rank saved nothing
    assert results[0] is not None and "error" in results[0], results[0]
    error = results[0]["error"]
    assert error.startswith("PeerError(") and re.search(r"(from|to) rank 1\b", error), error


def test_weight_grad_split_equals_full_backward_without_recompute():
    """B then W gives the full backward's grads; the input path's ops run once (counted)."""
    torch.manual_seed(0)
    model = ToyLM(VOCAB, DIM, LAYERS).double()
    stage = toy_stages(model, 4)[3]
    mb = toy_microbatches(1, B, T, VOCAB)[0]
    x = torch.randn(B, T, DIM, dtype=torch.float64, requires_grad=True)
    stage(x, mb).backward()
    ref = {n: p.grad.clone() for n, p in stage.named_parameters()}
    ref_dx, x.grad = x.grad.clone(), None
    model.zero_grad(set_to_none=True)

    calls = []
    h = stage.layers[0].down.register_full_backward_hook(lambda *a: calls.append(1))
    y = stage(x, mb)
    (dx,), weight = backward_input([y], [None], [x], list(stage.parameters()))
    assert all(p.grad is None for p in stage.parameters())   # B left every weight grad for W
    n_b = len(calls)
    weight()
    h.remove()
    assert n_b == 1 and len(calls) == 1   # W did not rerun the input path
    assert torch.equal(dx, ref_dx)
    for n, p in stage.named_parameters():
        assert _rel(p.grad, ref[n]) < 1e-28, n
