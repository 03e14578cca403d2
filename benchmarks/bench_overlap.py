"""Computation–communication overlap under DualPipe with expert parallelism (report §3.2.1, Figure 4):
the share of all-to-all time hidden under compute, and the step time of overlapped vs sequential F&B,
measured on the training executor: ``parallelize()`` builds ``OverlapPipeline`` over ``DSV3Stage``s (the
debug model's MLA + DeepSeekMoE Blocks, head and MTP), exactly as ``dsv3.train`` does.

8 gloo processes: 2 pipeline ranks × 4 expert ranks (2 simulated nodes × 2 GPUs per EP group; flat
dispatch, or two-hop with its hops pipelined in chunks on the communication thread: --dispatcher). Costs are modelled so that 2 shared CPU cores show the schedule, not contention: every
attention / routed-experts / shared-experts call also takes a fixed time (backward 2×), and every
all-to-all holds its rank's serial link for latency + max(IB bytes / IB bandwidth, NVLink bytes /
NVLink bandwidth), bytes being the real split sizes of this step's routing (IB : NVLink = 50 : 160).
*Sequential* runs the same executor with ``overlap=False`` (the same parts F then B).

    python benchmarks/bench_overlap.py                   # ≈ 3 min on 2 cores
    python benchmarks/bench_overlap.py --mtp-depth 0     # without the MTP module (its all-to-alls run unsplit)
    python benchmarks/bench_overlap.py --chunks 20 --trace /tmp/overlap.json   # open in ui.perfetto.dev
    python benchmarks/bench_overlap.py --mtp-depth 0 --dispatcher two_hop --a2a-chunks 4 --link honest
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from parallel.sim.launch import run_ranks  # noqa: E402

PP, EP, WORLD = 2, 4, 8


def _overrides(args) -> list[str]:
    dp = WORLD // PP
    return ["model.vocab_size=256", "model.n_layers=4", "model.n_dense_layers=0", f"model.mtp.depth={args.mtp_depth}",
            f"data.seq_len={args.seq}", f"train.micro_batch_size={args.batch}",
            f"train.global_batch={args.batch * args.chunks * dp}", "parallel.pp_schedule=dualpipe",
            f"parallel.pp={PP}", f"parallel.ep={EP}", "parallel.nodes=4", "parallel.ranks_per_node=2",
            f"parallel.dispatcher={args.dispatcher}", f"parallel.a2a_chunks={args.a2a_chunks}"]


def _rank(rank, world, args):
    import torch.distributed as dist
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from parallel.dsv3_stages import dsv3_microbatches
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    from parallel.sim.cost import add_compute_cost
    from parallel.sim.links import LinkModel, ModelledTransport, SerialLink
    from parallel.trace import Tracer
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "debug.yaml"), _overrides(args))
    mesh = Mesh.from_config(cfg.parallel)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.train()
    pm = parallelize(model, mesh, cfg)
    pipe = pm.pipe
    assert type(pipe).__name__ == "OverlapPipeline", type(pipe)
    ms = 1e-3
    blocks = [b for s in pipe.stage_module.values() for b in list(s.layers) + [m.block for m in getattr(s, "mtp", [])]]
    for b in blocks:
        for m, c in ((b.attn, args.attn_ms), (b.ffn.experts, args.mlp_ms), (b.ffn.shared_experts, args.shared_ms)):
            if m is not None:
                add_compute_cost(m, c * ms, 2 * c * ms)
    g = torch.Generator().manual_seed(1 + pm.dp_index)
    rows = torch.randint(0, cfg.model.vocab_size, (args.chunks * args.batch, args.seq + 1), generator=g)
    mbs = dsv3_microbatches(rows, args.chunks)
    out = {}
    for overlap in (False, True):
        tr = Tracer(rank)
        if args.link == "honest":
            link = LinkModel(args.ib_mbps, 3.2 * args.ib_mbps, unit=1e6, latency=args.latency_ms * ms)
        else:
            link = SerialLink(args.latency_ms * ms, {"inter": args.ib_mbps * 1e6, "intra": args.ib_mbps * 3.2e6})
        pipe.trace(tr, ModelledTransport(link))
        pipe.overlap = overlap
        times = []
        for step in range(args.steps + 1):
            tr.clear()
            dist.barrier()
            t0 = time.perf_counter()
            pipe.step(mbs)
            dist.barrier()
            times.append(time.perf_counter() - t0)
            for p in pipe.params.values():
                p.grad = None
        out[overlap] = dict(times=times[1:], events=[tuple(vars(e).values()) for e in tr.events])
    return out


def _hidden(ev) -> tuple[float, float]:
    """(share of the all-to-all time under compute, all-to-all seconds). Compute is the parts' spans less
    the time their thread waited on an all-to-all inside them (an unsplit piece: the head with MTP)."""
    from parallel.overlap import WAIT
    from parallel.trace import intersect, length, union
    comm = union((e.start, e.end) for e in ev if e.cat == "a2a")
    covered = intersect(comm, union((e.start, e.end) for e in ev if e.cat == "compute"))
    blocked = intersect(covered, union((e.start, e.end) for e in ev if e.cat == WAIT))
    total = length(comm)
    return ((length(covered) - length(blocked)) / total if total > 0 else 1.0), total


def _summary(events) -> dict:
    from parallel.trace import Event, length, union
    ev = [Event(*e) for e in events]
    frac, comm = _hidden(ev)
    fb = union((e.start, e.end) for e in ev if e.cat == "op" and e.name.startswith("FB"))
    in_fb = [e for e in ev if e.cat != "a2a" or any(a <= e.start and e.end <= b + 1e-3 for a, b in fb)]
    frac_fb, comm_fb = _hidden(in_fb)
    p2p = length(union((e.start, e.end) for e in ev if e.cat == "p2p"))
    return dict(frac=frac, comm=comm, frac_fb=frac_fb, comm_fb=comm_fb, p2p_wait=p2p,
                n_a2a=sum(e.cat == "a2a" for e in ev))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=40, help="micro-batches per step (DualPipe: even, ≥ 4)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--mtp-depth", type=int, default=1, help="MTP modules on the last stage (debug.yaml: 1)")
    ap.add_argument("--attn-ms", type=float, default=20.0, help="modelled attention forward (backward 2×)")
    ap.add_argument("--mlp-ms", type=float, default=20.0, help="modelled routed-experts forward")
    ap.add_argument("--shared-ms", type=float, default=10.0, help="modelled shared-expert forward")
    ap.add_argument("--latency-ms", type=float, default=3.0, help="fixed cost of each all-to-all")
    ap.add_argument("--ib-mbps", type=float, default=1.2, help="modelled IB MB/s per rank (NVLink 3.2×)")
    ap.add_argument("--dispatcher", choices=("flat", "two_hop"), default="flat")
    ap.add_argument("--a2a-chunks", type=int, default=1, help="two_hop: IB/NVLink pipelining chunks")
    ap.add_argument("--link", choices=("serial", "honest"), default="serial",
                    help="serial: one stream per rank, IB and NVLink of an all-to-all concurrent on it; honest: "
                         "parallel.sim.links.LinkModel (a serial IB and a serial NVLink link, latency per message)")
    ap.add_argument("--trace", default="", help="write the overlapped step's Chrome trace here")
    args = ap.parse_args()

    res = run_ranks(_rank, WORLD, args, timeout=900, env={"OMP_NUM_THREADS": "1"})
    step = {ov: statistics.median(max(r[ov]["times"][i] for r in res) for i in range(args.steps))
            for ov in (False, True)}
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"DualPipe through parallelize(), {PP} pipeline ranks × {EP} expert ranks, {args.chunks} micro-batches of "
          f"{args.batch}×{args.seq}, MTP depth {args.mtp_depth}; modelled attn/mlp/shared "
          f"{args.attn_ms}/{args.mlp_ms}/{args.shared_ms} ms (bwd 2×), a2a {args.latency_ms} ms + bytes at IB "
          f"{args.ib_mbps} MB/s, NVLink {3.2 * args.ib_mbps:g} MB/s ({args.link} link model); dispatcher "
          f"{args.dispatcher}" + (f", {args.a2a_chunks} chunks" if args.dispatcher == "two_hop" else "") +
          f"; CPU ISA {isa}")
    print(f"{'rank':>4s} {'a2a':>5s} {'a2a s':>7s} {'hidden':>7s} {'a2a s in FB':>11s} {'hidden in FB':>12s} "
          f"{'P2P wait s':>10s}")
    sums = {}
    for ov in (False, True):
        print("overlapped" if ov else "sequential F then B")
        tot = dict(comm=0.0, hid=0.0, comm_fb=0.0, hid_fb=0.0)
        for rank, r in enumerate(res):
            s = _summary(r[ov]["events"])
            tot["comm"] += s["comm"]
            tot["hid"] += s["frac"] * s["comm"]
            tot["comm_fb"] += s["comm_fb"]
            tot["hid_fb"] += s["frac_fb"] * s["comm_fb"]
            print(f"{rank:4d} {s['n_a2a']:5d} {s['comm']:7.3f} {s['frac']:7.1%} {s['comm_fb']:11.3f} "
                  f"{s['frac_fb']:12.1%} {s['p2p_wait']:10.3f}")
        sums[ov] = tot
        print(f"all  {'':5s} {tot['comm']:7.3f} {tot['hid'] / tot['comm']:7.1%} {tot['comm_fb']:11.3f} "
              f"{tot['hid_fb'] / tot['comm_fb']:12.1%}   step {step[ov] * 1e3:.0f} ms")
    ov = sums[True]
    print(f"\ncommunication overlapped: {ov['hid'] / ov['comm']:.1%} of all all-to-all time "
          f"({ov['hid_fb'] / ov['comm_fb']:.1%} inside paired F&B ops; target ≥ 90%)  [CPU ISA {isa}]")
    print(f"step time overlapped / sequential: {step[True] * 1e3:.0f} / {step[False] * 1e3:.0f} ms = "
          f"{step[True] / step[False]:.3f}  [CPU ISA {isa}]")
    if args.trace:
        from parallel.trace import Event, write_chrome_trace
        write_chrome_trace(args.trace, [[Event(*e) for e in r[True]["events"]] for r in res])
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
