"""Overlapped F&B chunks (report §3.2.1, Figure 4; parallel/overlap.py).

1. A paired F&B op of a ``DSV3Stage`` (embedding, 2 MoE Blocks, head) on 2 expert-parallel gloo processes,
   every all-to-all holding a serial link for a fixed 0.15 s and every attention / experts / shared-experts
   call a fixed 0.05 s forward, 0.1 s backward, all in modelled time (a clock only those costs advance, so no
   assertion depends on the machine or its load): the overlapped op takes exactly max(compute,
   communication), the non-overlapped one their sum less what a chunk hides under its own shared experts;
   each all-to-all is covered by the other micro-batch's compute; the loss and every gradient are bitwise
   those of the plain stage (``DSV3Stage.forward`` + autograd) in both runs.
2. Pure checks: 1F1B pairing (and its cost on plain 1F1B), interval arithmetic, Chrome-trace lanes.
The executor on the training path (``parallelize`` → ``OverlapPipeline``) is tests/test_overlap_train.py.
"""
from __future__ import annotations

import pytest
import torch

from parallel.overlap import pair_1f1b
from parallel.schedules import all_schedules
from parallel.simulate import Costs, simulate
from parallel.sim.clock import ModelledClock
from parallel.trace import Event, chrome_trace, overlapped_fraction
from tests.conftest import tiny_cfg
from tests.dist_utils import run_ranks

LATENCY, COST = 0.15, 0.05


def _microbatches(n: int, seed: int, vocab: int = 97, B: int = 2, T: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [dict(tokens=torch.randint(0, vocab, (B, T), generator=g), labels=torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(n)]


def _ep_model(cfg, latency: float, tracer, mesh=None):
    from dsv3.model.transformer import Transformer
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.mesh import Mesh
    from parallel.overlap import trace_all_to_alls
    from parallel.sim.links import ModelledTransport, SerialLink
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.train()
    mesh = mesh or Mesh.from_config(cfg.parallel)
    apply_expert_parallel(model, mesh, cfg.parallel, kind="flat")
    trace_all_to_alls(model, tracer, ModelledTransport(SerialLink(latency)))
    return model, mesh


# ------------------------------------------------------------------------ 1. one paired op
def _paired_op(rank, world):
    import parallel.sim.cost
    import parallel.sim.links
    import parallel.trace
    from parallel.dsv3_stages import DSV3Stage
    from parallel.overlap import drain, run_pair, stage_backward, stage_forward
    from parallel.sim.cost import add_compute_cost
    from parallel.trace import Tracer, length, overlap_with_other, union
    clock = parallel.trace.time = parallel.sim.links.time = parallel.sim.cost.time = ModelledClock()  # this rank
    tr = Tracer(rank)
    model, _ = _ep_model(tiny_cfg("model.n_dense_layers=0", "parallel.ep=2"), LATENCY, tr)
    for b in model.layers:
        for m in (b.attn, b.ffn.experts, b.ffn.shared_experts):
            add_compute_cost(m, COST, 2 * COST)
    stage = DSV3Stage(model, 0, 2, True, True)
    mb_f, mb_b = _microbatches(2, 10 + rank)
    params = [p for p in model.parameters() if p.requires_grad]

    def take_grads():
        out = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return out

    # the plain module: B's forward, A's forward, B's backward (also warms autograd up)
    loss_b = stage(None, mb_b)
    loss_f = stage(None, mb_f)
    loss_b.backward()
    ref = (loss_f.detach(), take_grads())
    out = {}
    for overlap in (False, True):
        _, record_b = drain(stage_forward(stage, None, mb_b, tr))
        tr.clear()
        t0 = clock.now
        (y, _), _ = run_pair(stage_forward(stage, None, mb_f, tr), stage_backward(record_b, None, tr), tr, 0, 1,
                             overlap)
        span = clock.now - t0
        ev = list(tr.events)
        a2a = [e for e in ev if e.cat == "a2a"]
        out[overlap] = dict(
            span=span, n_a2a=len(a2a),
            compute=length(union((e.start, e.end) for e in ev if e.cat == "compute")),
            comm=length(union((e.start, e.end) for e in a2a)),
            hidden=overlapped_fraction(ev)[0],
            covered_by_other=[overlap_with_other(e, ev) / (e.end - e.start) for e in a2a],
            loss_equal=bool(torch.equal(y.detach(), ref[0])),
            grads_equal=all(torch.equal(a, b) for a, b in zip(take_grads(), ref[1])))
    return out


def test_paired_op_hides_fixed_latency_all_to_all():
    """In modelled time (``ModelledClock``): per rank 2 MoE layers, each with attention, experts and shared
    experts at COST forward, 2·COST backward, and 4 all-to-alls of LATENCY on one serial link. The wall-clock
    side of the claim (overlapped vs sequential step time) is measured in benchmarks/bench_overlap.py."""
    same = dict(rel=1e-9)                          # sums of a few modelled costs: only float rounding
    compute, comm = 2 * 3 * (COST + 2 * COST), 8 * LATENCY
    for res in run_ranks(_paired_op, 2, timeout=120):
        seq, ov = res[False], res[True]
        for r in (seq, ov):
            assert r["loss_equal"] and r["grads_equal"]
            assert r["n_a2a"] == 8                                     # 2 MoE layers × (dispatch, combine) × (F, B)
            assert r["comm"] == pytest.approx(comm, **same)           # the link is serial
            assert r["compute"] == pytest.approx(compute, **same)
        # unpaired: a chunk hides only its own shared experts (COST + 2·COST per layer: shared F under its
        # dispatch, shared B under its dispatch-bwd),
        # the rest of compute and communication add up
        own_shared = 2 * (COST + 2 * COST)
        assert seq["hidden"] * seq["comm"] == pytest.approx(own_shared, **same)
        assert seq["span"] == pytest.approx(compute + comm - own_shared, **same)
        # paired: the link never idles, so the op takes max(compute, communication) (1.2 s against the
        # sequential 1.8 s), with all compute hidden under communication (compute < comm here)
        assert ov["span"] == pytest.approx(max(compute, comm), **same), ov
        assert ov["hidden"] * ov["comm"] == pytest.approx(min(compute, comm), **same)
        # each all-to-all runs under at least one COST of the other micro-batch's compute (a third of it);
        # sequential: none does
        assert min(ov["covered_by_other"]) >= COST / LATENCY - 1e-9, ov["covered_by_other"]
        assert max(seq["covered_by_other"]) == 0.0


# -------------------------------------------------------------------------------- 2. pure
@pytest.mark.parametrize("N,C", [(4, 8), (3, 5), (2, 2)])
def test_pair_1f1b(N, C):
    scheds = [pair_1f1b(s) for s in all_schedules("1f1b", N, C)]
    for r, ops in enumerate(scheds):
        warm = min(N - 1 - r, C)
        fb = [op for op in ops if op.kind == "FB"]
        assert len(fb) == (C - warm if r < N - 1 else 0)
        assert all(op.f.mb == op.b.mb + warm for op in fb)
        parts = [p for op in ops for p in op.parts()]
        assert sorted((p.kind, p.mb) for p in parts) == sorted([("F", m) for m in range(C)] + [("B", m) for m in range(C)])
    # no deadlock; the steady state issues one pair per 2·F&B (the cycle through rank r+1), where unpaired
    # 1F1B issues one F and one B per F + B
    costs = Costs(F=1, B=2, Bi=1, W=1, FB=3)
    tl = simulate("1f1b", N, C, costs, scheds).timeline[0]
    starts = [t0 for t0, _, op in tl if op.kind == "FB"]
    if N > 1 and len(starts) >= 3:
        assert starts[2] - starts[1] == 2 * costs.FB
    plain = [t0 for t0, _, op in simulate("1f1b", N, C, costs).timeline[0] if op.kind == "B"]
    if len(plain) >= 3:
        assert plain[2] - plain[1] == costs.F + costs.B


def test_overlapped_fraction_and_trace_lanes():
    ev = [Event("attn F", "compute", 0.0, 1.0), Event("mlp B", "compute", 2.0, 3.0),
          Event("dispatch", "a2a", 0.5, 2.5), Event("combine", "a2a", 2.0, 4.0)]
    frac, comm = overlapped_fraction(ev)
    assert comm == 3.5 and frac == pytest.approx(1.5 / 3.5)
    trace = chrome_trace([ev, ev[:1]])
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 5
    a2a = sorted((e for e in xs if e["pid"] == 0 and e["cat"] == "a2a"), key=lambda e: e["ts"])
    assert a2a[0]["tid"] != a2a[1]["tid"]          # overlapping spans on separate lanes
    assert a2a[0]["ts"] == 0.5e6 and a2a[1]["dur"] == 2.0e6
