"""Expert-parallel dispatch: flat vs two-hop vs two-hop with node-limited routing (report §3.2.2),
and two-hop with its IB and NVLink hops pipelined in chunks (report §3.2.2; parallel/two_hop_chunks.py).

1. Traffic model for DeepSeek-V3's routing shape (256 experts, top-8, 8 groups, 4 kept) on 8 nodes × 8 GPUs
   (EP64, 4 experts per GPU, one group = one node), from real router outputs (dsv3.model.moe.Gate on random
   hidden states with a random gate weight): inter-node copies and bytes per token, counted with the
   routing plans the dispatcher uses, and the modelled dispatch time per GPU at IB 50 GB/s, NVLink 160 GB/s.
2. Measured dispatch + combine on 8 gloo processes standing in for 4 nodes × 2 GPUs (256 experts, top-8,
   8 groups: one per GPU; node limit 2 = 2 groups kept), 4096 tokens of width 2048 per rank: flat, two-hop
   unchunked and two-hop in 2, 4, 8 chunks, FP8 dispatch off and on. Every all-to-all takes the time of
   ``parallel.sim.links.LinkModel`` (one serial IB link at 50 and one serial NVLink link at 160 units per
   rank, FIFO, latency = 4 KB on IB per message, unit = --unit bytes/s), installed as the dispatcher's
   transport (``ModelledTransport``) and slept out by the receiver until its senders' links are done:
   loopback has no IB/NVLink asymmetry by itself. The unit is slow enough
   (IB 12.5 MB/s) that loopback TCP on 2 shared cores is not the bottleneck. Beside each measurement:
   the bytes per hop, the modelled time of the run (its link bookings, at the times the ranks issued
   them) and the traffic model's prediction for the same routing (``predict_route``: the same link rules
   with no CPU time, issued by the whole cluster at once).

    python benchmarks/bench_all_to_all.py [--iters 2] [--unit 2.5e5] [--skip-v3]   # ≈ 3 min on 2 cores
The last line is ``two-hop chunked vs flat: N.NNx`` (flat = the plain all-to-all without node limit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dsv3.config import MoEConfig, ParallelConfig  # noqa: E402
from dsv3.model.moe import Gate  # noqa: E402
from parallel.sim.launch import run_ranks  # noqa: E402
from parallel.routing_plan import Topology, cluster_plan, plan_flat, plan_inter, plan_intra, mask_choices  # noqa: E402

IB, NVLINK = 50e9, 160e9                       # bytes/s per GPU (report §3.2.2)
HIDDEN, E, TOPK, GROUPS = 7168, 256, 8, 8
NODES, RPN, WORLD = 4, 2, 8                    # the measured shape
CHUNKS = (1, 2, 4, 8)


def v3_router(topk_group: int, tokens: int, dim: int, seed: int = 0, x_seed=None) -> tuple:
    torch.manual_seed(seed)
    gate = Gate(dim, MoEConfig(n_routed_experts=E, n_activated_experts=TOPK, n_group=GROUPS,
                               topk_group=topk_group, routed_scaling_factor=2.5))
    torch.nn.init.normal_(gate.weight, std=dim ** -0.5)
    x = torch.randn(tokens, dim) if x_seed is None else \
        torch.randn(tokens, dim, generator=torch.Generator().manual_seed(x_seed)).to(torch.bfloat16)
    with torch.no_grad():
        w, idx, _ = gate(x.float())
    return x, w, idx


def row_bytes(fp8: bool, dim: int = HIDDEN) -> int:
    """One dispatched copy: hidden (E4M3 + 1×128 fp32 pow2 scales, or BF16) + k fp32 weights + k int32 slots."""
    x = dim + 4 * (dim // 128) if fp8 else 2 * dim
    return x + 8 * TOPK


def traffic_model(idx: torch.Tensor, nodes: int = 8, gpus: int = 8) -> dict:
    """Copies per token on each link when token t starts on GPU t mod (nodes·gpus)."""
    topo = Topology(nodes, gpus, E // (nodes * gpus))
    world = nodes * gpus
    src = torch.arange(idx.shape[0]) % world
    inter = {"flat": 0, "two_hop": 0}
    intra = {"flat": 0, "two_hop": 0}
    for s in range(world):
        mine = idx[src == s]
        node = s // gpus
        p = plan_flat(mine, topo)
        dest_node = p.send_dest // gpus
        inter["flat"] += int((dest_node != node).sum())
        intra["flat"] += int(((dest_node == node) & (p.send_dest != s)).sum())
        p1 = plan_inter(mine, topo)
        inter["two_hop"] += int((p1.send_dest != node).sum())
        # hop 2 at the relay (same local index on each destination node): copies to other local ranks
        p2 = plan_intra(mask_choices(mine, p1), topo)
        relay_local = s % gpus
        intra["two_hop"] += int((p2.send_dest != relay_local).sum())
    n = idx.shape[0]
    return {k: (inter[k] / n, intra[k] / n) for k in inter}


def v3_model(tokens: int, dim: int) -> None:
    print(f"== traffic model: V3 routing (E={E}, top-{TOPK}, {GROUPS} groups) on 8 nodes x 8 GPUs, "
          f"{tokens} tokens, router dim {dim}")
    limited = traffic_model(v3_router(4, tokens, dim)[2])
    unlimited = traffic_model(v3_router(GROUPS, tokens, dim)[2])
    rows = {"flat (no node limit)": unlimited["flat"], "flat + node limit": limited["flat"],
            "two-hop (no node limit)": unlimited["two_hop"], "two-hop + node limit": limited["two_hop"]}
    fp8_row = row_bytes(True)
    print(f"  bytes per copy: FP8 dispatch {fp8_row}, BF16 {row_bytes(False)} (hidden {HIDDEN} + weights/slots)")
    print(f"  {'dispatcher':<26}{'IB copies/tok':>14}{'NVL copies/tok':>15}{'IB KB/tok':>11}"
          f"{'us (max)':>10}{'us (IB+NVL)':>13}   (FP8 dispatch, 1000 tokens per GPU)")
    model_us = {}
    for name, (inter, intra) in rows.items():
        ib_s, nvl_s = inter * fp8_row * 1000 / IB, intra * fp8_row * 1000 / NVLINK
        model_us[name] = (max(ib_s, nvl_s) * 1e6, (ib_s + nvl_s) * 1e6)
        seq = f"{model_us[name][1]:>13.1f}" if name.startswith("two") else f"{'':>13}"
        print(f"  {name:<26}{inter:>14.3f}{intra:>15.3f}{inter * fp8_row / 1024:>11.1f}{model_us[name][0]:>10.1f}{seq}")
    f, t = rows["flat (no node limit)"][0], rows["two-hop + node limit"][0]
    print(f"  inter-node copies per token, flat / two-hop+node-limit (EP64): {f:.2f} / {t:.2f} = {f / t:.2f}x")
    f_us, t_us = model_us["flat (no node limit)"][0], model_us["two-hop + node limit"]
    print(f"  modelled dispatch time, flat / two-hop+node-limit (EP64): {f_us / t_us[0]:.2f}x pipelined, "
          f"{f_us / t_us[1]:.2f}x hops in sequence")


# ------------------------------------------------------------------------------ 4 nodes × 2
def _links():
    node = lambda r: r // RPN  # noqa: E731
    flat = lambda s, d: "self" if s == d else ("intra" if node(s) == node(d) else "inter")  # noqa: E731
    inter = lambda s, d: flat(s, d) if s % RPN == d % RPN else None  # noqa: E731
    intra = lambda s, d: flat(s, d) if node(s) == node(d) else None  # noqa: E731
    return flat, inter, intra


def predictions(tokens: int, dim: int, unit: float) -> dict:
    """The traffic model for the measured shape: per configuration (kind, fp8, chunks), the bytes each hop
    carries (copy matrices from the routing plans × bytes per copy) and predict_route's time."""
    from parallel.sim.links import LinkModel, predict_route
    topo = Topology(NODES, RPN, E // WORLD)
    idx = {tg: [v3_router(tg, tokens, dim, x_seed=r)[2] for r in range(WORLD)] for tg in (GROUPS, 2)}
    flat_m = cluster_plan(idx[GROUPS], topo, "flat")["hops"][0]
    m1, m2 = cluster_plan(idx[2], topo, "two_hop")["hops"]
    flat_l, inter_l, intra_l = _links()
    back = 2 * dim                                     # combine returns BF16 rows
    out = {}
    for fp8 in (False, True):
        rb = row_bytes(fp8, dim)
        out[("flat", fp8, 1)] = predict_route([flat_m * rb], [flat_l], 1, lambda: LinkModel(unit=unit),
                                              [flat_m * back])
        for c in CHUNKS:
            out[("two_hop", fp8, c)] = predict_route([m1 * rb, m2 * rb], [inter_l, intra_l], c,
                                                     lambda: LinkModel(unit=unit), [m1 * back, m2 * back])
    copies = {"flat": _per_link(flat_m, flat_l), "two_hop": (_per_link(m1, inter_l), _per_link(m2, intra_l))}
    return dict(time=out, copies=copies, tokens=tokens * WORLD)


def _per_link(m: torch.Tensor, link_of) -> dict:
    out = {"inter": 0, "intra": 0}
    for s in range(m.shape[0]):
        for d in range(m.shape[1]):
            if link_of(s, d) in out:
                out[link_of(s, d)] += int(m[s, d])
    return out


def _measure(rank, world, tokens, dim, iters, unit):
    import torch.distributed as dist
    from parallel.all_to_all import EPDispatcher
    from parallel.sim.links import LinkModel, ModelledTransport
    from parallel.mesh import Mesh
    from parallel.placement import Placement
    mesh = Mesh.from_config(ParallelConfig(ep=world, nodes=NODES, ranks_per_node=RPN))
    routes = {tg: v3_router(tg, tokens, dim, x_seed=rank) for tg in (GROUPS, 2)}
    with torch.no_grad():      # warm-up: connects every group, starts the communication thread
        for kind, C in (("flat", 1), ("two_hop", CHUNKS[-1])):
            x, w, idx = (t[:64] for t in routes[2])
            disp = EPDispatcher(mesh, Placement.contiguous(E, world), kind, True,
                                transport=ModelledTransport(LinkModel(unit=unit)), chunks=C)
            recv = disp.dispatch(x, idx, w).wait()
            disp.combine(recv.x, recv).wait()
    res = {}
    for fp8 in (False, True):
        for kind, C in [("flat", 1)] + [("two_hop", c) for c in CHUNKS]:
            x, w, idx = routes[GROUPS if kind == "flat" else 2]
            disp = EPDispatcher(mesh, Placement.contiguous(E, world), kind, fp8,
                                transport=ModelledTransport(LinkModel(unit=unit)), chunks=C)
            wall, model = [], []
            with torch.no_grad():
                for it in range(iters):
                    dist.barrier()
                    t0 = time.perf_counter()
                    recv = disp.dispatch(x, idx, w).wait()
                    y = disp.combine(recv.x * recv.weight.sum(1, keepdim=True).to(recv.x.dtype), recv).wait()
                    t1 = time.perf_counter()
                    dist.barrier()
                    wall.append(t1 - t0)
                    model.append(disp.transport.model_done - t0)
            t = torch.tensor([wall, model], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)          # an iteration ends when its last rank is done
            n = iters
            res[(kind, fp8, C)] = dict(wall=t[0].min().item(), model=t[1].min().item(), y=float(y.float().abs().sum()),
                                       bytes={lk: disp.traffic.total(lk, "dispatch") / n for lk in ("inter", "intra")})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank in the measured run")
    ap.add_argument("--dim", type=int, default=2048, help="hidden width in the measured run")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per configuration")
    ap.add_argument("--unit", type=float, default=2.5e5, help="bytes/s per bandwidth unit (IB 50, NVLink 160)")
    ap.add_argument("--v3-tokens", type=int, default=4096, help="tokens for the EP64 traffic model")
    ap.add_argument("--skip-v3", action="store_true", help="skip the EP64 traffic model")
    a = ap.parse_args()
    if not a.skip_v3:
        v3_model(a.v3_tokens, HIDDEN)

    pred = predictions(a.tokens, a.dim, a.unit)
    lat = 4096 / (50 * a.unit)
    print(f"== measured: 8 gloo processes as {NODES} nodes x {RPN}, {a.tokens} tokens/rank of width {a.dim} (BF16), "
          f"E={E} top-{TOPK}, {GROUPS} groups (one per rank); flat: no node limit; two-hop: node limit 2 "
          f"(2 groups kept)\n   link model: IB {50 * a.unit / 1e6:g} MB/s, NVLink {160 * a.unit / 1e6:g} MB/s per rank, "
          f"serial FIFO, {lat * 1e6:.0f} us per message; best of {a.iters} iterations, each until its last rank is done; "
          f"CPU ISA {torch.backends.cpu.get_cpu_capability()}")
    cp, n = pred["copies"], pred["tokens"]
    print(f"   traffic model copies/token: flat IB {cp['flat']['inter'] / n:.3f} NVLink {cp['flat']['intra'] / n:.3f}; "
          f"two-hop hop 1 IB {cp['two_hop'][0]['inter'] / n:.3f}, hop 2 NVLink {cp['two_hop'][1]['intra'] / n:.3f}")
    t0 = time.perf_counter()
    r = run_ranks(_measure, WORLD, a.tokens, a.dim, a.iters, a.unit, timeout=1200, env={"OMP_NUM_THREADS": "1"})[0]
    print(f"   ({time.perf_counter() - t0:.0f} s)")
    print(f"  {'dispatcher':<24}{'FP8':>4}{'IB MB/rank':>11}{'NVL MB/rank':>12}{'modelled s':>11}{'measured s':>11}"
          f"{'predicted s':>12}{'meas/pred':>10}")
    best = {}
    for fp8 in (False, True):
        for kind, C in [("flat", 1)] + [("two_hop", c) for c in CHUNKS]:
            m, p = r[(kind, fp8, C)], pred["time"][(kind, fp8, C)]
            name = "flat" if kind == "flat" else ("two-hop unchunked" if C == 1 else f"two-hop {C} chunks")
            print(f"  {name:<24}{'on' if fp8 else 'off':>4}{m['bytes']['inter'] / 1e6:>11.2f}"
                  f"{m['bytes']['intra'] / 1e6:>12.2f}{m['model']:>11.3f}{m['wall']:>11.3f}{p:>12.3f}"
                  f"{m['wall'] / p:>10.2f}")
        chunked = min(CHUNKS[1:], key=lambda c: r[("two_hop", fp8, c)]["wall"])
        best[fp8] = chunked
    same = all(r[("two_hop", f, c)]["y"] == r[("two_hop", f, 1)]["y"] for f in (False, True) for c in CHUNKS)
    print(f"  combined output checksum equal for every chunk count (rank 0): {same}")
    print("== ratios (measured, and the traffic model's prediction for the same routing)")
    for fp8 in (False, True):
        c = best[fp8]
        f, u, k = r[("flat", fp8, 1)]["wall"], r[("two_hop", fp8, 1)]["wall"], r[("two_hop", fp8, c)]["wall"]
        pf, pu, pk = (pred["time"][(kind, fp8, cc)] for kind, cc in (("flat", 1), ("two_hop", 1), ("two_hop", c)))
        tag = "FP8 dispatch" if fp8 else "BF16 dispatch"
        print(f"  {tag}: best chunk count {c}; chunked vs unchunked {u / k:.2f}x (predicted {pu / pk:.2f}x); "
              f"chunked vs flat {f / k:.2f}x (predicted {pf / pk:.2f}x, measured/predicted {f / k / (pf / pk):.2f}); "
              f"unchunked vs flat {f / u:.2f}x (predicted {pf / pu:.2f}x)")
    c = best[False]
    print(f"two-hop chunked vs flat: {r[('flat', False, 1)]['wall'] / r[('two_hop', False, c)]['wall']:.2f}x")


if __name__ == "__main__":
    main()
