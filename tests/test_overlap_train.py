"""The overlapped F&B on the training path (report §3.2.1; issue 16): ``parallelize()`` + ``train_step`` on
4 gloo processes, DualPipe over 2 pipeline ranks × expert parallelism over 2 ranks (the debug model: MLA, MoE
with shared expert, bias update and balance loss, MTP), and DualPipeV on the same mesh (every layer MoE, so
that each of its 4 stages has all-to-alls).

1. ``parallel.overlap=true`` builds ``OverlapPipeline`` and ``false`` the plain ``Pipeline``; two steps each
   (DualPipe in fp32, DualPipeV in fp64): the losses (and their parts and grad norms) and every weight and
   routing bias after the steps are bitwise equal.
2. The overlapped run, traced: on every pipeline rank some FB op issues an all-to-all of one micro-batch
   between two compute parts of the other (Figure 4's interleaving); the run with ``overlap=false`` traced
   the same way (``OverlapPipeline(overlap=False)``, the same parts F then B) never does.
"""
from __future__ import annotations

import torch

from tests.conftest import config_path
from tests.dist_utils import run_ranks

WORLD, SEQ, ROWS, STEPS = 4, 16, 4, 2   # ROWS: sequences per DP replica and step (4 micro-batches of 1)
BASE = [f"data.seq_len={SEQ}", "train.micro_batch_size=1", f"train.global_batch={2 * ROWS}", "parallel.pp=2",
        "parallel.ep=2", "parallel.dispatcher=flat"]


def _run(rank, overrides: list[str], dtype: torch.dtype, trace: str = ""):
    """Two train steps through parallelize(); trace: '' (none), 'on' / 'off' (OverlapPipeline with
    that ``overlap``, every part and all-to-all recorded)."""
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    from parallel.trace import Tracer
    cfg = load_config(config_path("debug.yaml"), BASE + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(dtype)
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg.model.vocab_size, (2 * ROWS, SEQ + 1), generator=g)
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    tracer = None
    if trace:
        tracer = Tracer(rank)
        pm.pipe.overlap = trace == "on"
        pm.pipe.trace(tracer)
    rows = batch[pm.dp_index * ROWS:(pm.dp_index + 1) * ROWS]
    stats = [pm.train_step(rows, cfg.train.lr, model.mtp_weight) for _ in range(STEPS)]
    for s in stats:
        s.pop("loads")
    weights = {n: p.detach().clone() for n, p in pm.params.items()}
    weights.update({n: b.clone() for n, b in pm.pipe.buffers.items() if n.endswith("e_score_correction_bias")})
    return dict(executor=type(pm.pipe).__name__, stats=stats, weights=weights,
                events=[tuple(vars(e).values()) for e in tracer.events] if tracer else None)


def _worker(rank, world):
    runs = {}
    for kind, extra, dtype in (("dualpipe", [], torch.float32),
                               ("dualpipev", ["model.n_dense_layers=0"], torch.float64)):
        o = [f"parallel.pp_schedule={kind}"] + extra
        runs[kind, "on"] = _run(rank, o, dtype, trace="on")
        runs[kind, "off"] = _run(rank, o + ["parallel.overlap=false"], dtype)
        if kind == "dualpipe":
            runs[kind, "traced_off"] = _run(rank, o, dtype, trace="off")
    return runs


def interleaved_ops(events) -> list[str]:
    """FB ops during which an all-to-all of one micro-batch was issued between two compute parts of the
    other micro-batch of the pair."""
    from parallel.trace import Event
    ev = [Event(*e) for e in events]
    out = []
    for op in (e for e in ev if e.cat == "op" and e.name.startswith("FB")):
        inside = [e for e in ev if e.cat in ("compute", "a2a") and op.start <= e.start <= op.end]
        for a in (e for e in inside if e.cat == "a2a"):
            other = [c for c in inside if c.cat == "compute" and c.mb != a.mb and c.phase != a.phase]
            if any(c.end <= a.start for c in other) and any(c.start >= a.start for c in other):
                out.append(op.name)
                break
    return out


def test_overlap_on_off_bitwise_and_interleaved():
    results = run_ranks(_worker, WORLD, timeout=300)
    for kind in ("dualpipe", "dualpipev"):
        for rank, r in enumerate(results):
            on, off = r[kind, "on"], r[kind, "off"]
            assert (on["executor"], off["executor"]) == ("OverlapPipeline", "Pipeline")
            assert on["stats"] == off["stats"], (kind, rank, on["stats"], off["stats"])
            assert sorted(on["weights"]) == sorted(off["weights"]) and len(on["weights"]) > 20
            differ = [n for n in on["weights"] if not torch.equal(on["weights"][n], off["weights"][n])]
            assert not differ, (kind, rank, differ)
            assert on["stats"][1]["loss"] < on["stats"][0]["loss"]    # the same batch twice: it trains
            # Figure 4 on every rank: some FB op interleaves its two micro-batches
            assert interleaved_ops(on["events"]), (kind, rank)
            if (kind, "traced_off") in r:   # the same parts F then B: never
                assert r[kind, "traced_off"]["stats"] == on["stats"]
                assert interleaved_ops(r[kind, "traced_off"]["events"]) == [], (kind, rank)
