"""Expert-parallel dispatch: flat vs two-hop vs two-hop with node-limited routing (SPEC §5).

1. Traffic model for DeepSeek-V3's routing shape (256 experts, top-8, 8 groups, 4 kept) on 8 nodes × 8 GPUs
   (EP64, 4 experts per GPU, one group = one node), from real router outputs (dsv3.moe.Gate on random
   hidden states with a random gate weight): inter-node copies and bytes per token, counted with the
   routing plans the dispatcher uses, and the modelled dispatch time per GPU at IB 50 GB/s, NVLink 160 GB/s.
2. Measured dispatch + combine time on 8 gloo processes (2 nodes × 4) where every send also sleeps
   bytes / bandwidth at the 50 : 160 ratio (loopback has no such asymmetry by itself).

    python benchmarks/bench_all_to_all.py [--tokens 4096] [--measure-tokens 512] [--iters 5]
Ratios are printed last.
"""
from __future__ import annotations

import argparse
import time

import torch

from dsv3.config import MoEConfig, ParallelConfig
from dsv3.moe import Gate
from parallel.launch_utils import run_ranks
from parallel.routing_plan import Topology, plan_flat, plan_inter, plan_intra, mask_choices

IB, NVLINK = 50e9, 160e9                       # bytes/s per GPU (SPEC §5)
HIDDEN, E, TOPK, GROUPS = 7168, 256, 8, 8


def v3_router(topk_group: int, tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    gate = Gate(dim, MoEConfig(n_routed_experts=E, n_activated_experts=TOPK, n_group=GROUPS,
                               topk_group=topk_group, routed_scaling_factor=2.5))
    torch.nn.init.normal_(gate.weight, std=dim ** -0.5)
    with torch.no_grad():
        return gate(torch.randn(tokens, dim))[1]


def row_bytes(fp8: bool) -> int:
    """One dispatched copy: hidden (E4M3 + 1×128 fp32 pow2 scales, or BF16) + k fp32 weights + k int32 slots."""
    x = HIDDEN + 4 * (HIDDEN // 128) if fp8 else 2 * HIDDEN
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


def _measure(rank, world, kind, fp8, tokens, dim, iters, bw):
    import torch.distributed as dist
    from parallel.all_to_all import EPDispatcher
    from parallel.mesh import Mesh
    from parallel.placement import Placement
    mesh = Mesh.from_config(ParallelConfig(ep=world, nodes=2, ranks_per_node=4))
    torch.manual_seed(0)
    gate = Gate(dim, MoEConfig(n_routed_experts=E, n_activated_experts=TOPK, n_group=GROUPS, topk_group=4))
    torch.nn.init.normal_(gate.weight, std=dim ** -0.5)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, dim, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        w, idx, _ = gate(x.float())
    disp = EPDispatcher(mesh, Placement.contiguous(E, world), kind, fp8, sim_bandwidth=bw)
    times = []
    with torch.no_grad():
        for it in range(iters + 1):
            dist.barrier()
            t0 = time.perf_counter()
            recv = disp.dispatch(x, idx, w).wait()
            y = disp.combine(recv.x * recv.weight.sum(1, keepdim=True).to(recv.x.dtype), recv).wait()
            dist.barrier()
            if it:
                times.append(time.perf_counter() - t0)
    t = torch.tensor(sorted(times)[len(times) // 2])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    inter = disp.traffic.total("inter", "dispatch") / (iters + 1)
    return dict(time=t.item(), inter_bytes=inter, y=float(y.float().abs().sum()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="tokens for the traffic model")
    ap.add_argument("--dim", type=int, default=HIDDEN, help="router input width for the traffic model")
    ap.add_argument("--measure-tokens", type=int, default=512, help="tokens per rank in the measured run")
    ap.add_argument("--measure-dim", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--ib", type=float, default=25e6, help="simulated inter-node bytes/s per rank (measured run)")
    a = ap.parse_args()

    print(f"== traffic model: V3 routing (E={E}, top-{TOPK}, {GROUPS} groups) on 8 nodes x 8 GPUs, "
          f"{a.tokens} tokens, router dim {a.dim}")
    limited = traffic_model(v3_router(4, a.tokens, a.dim))
    unlimited = traffic_model(v3_router(GROUPS, a.tokens, a.dim))
    rows = {"flat (no node limit)": unlimited["flat"], "flat + node limit": limited["flat"],
            "two-hop (no node limit)": unlimited["two_hop"], "two-hop + node limit": limited["two_hop"]}
    fp8_row, bf16_row = row_bytes(True), row_bytes(False)
    print(f"  bytes per copy: FP8 dispatch {fp8_row}, BF16 {bf16_row} (hidden {HIDDEN} + weights/slots)")
    print("  modelled FP8 dispatch time for 1000 tokens per GPU: links busy concurrently (max of IB, NVLink: one\n"
          "  flat collective, or DeepEP-style pipelined hops) and, for two-hop, hops in sequence (IB + NVLink)")
    print(f"  {'dispatcher':<26}{'IB copies/tok':>14}{'NVL copies/tok':>15}{'IB KB/tok':>11}"
          f"{'us (max)':>10}{'us (IB+NVL)':>13}")
    model_us = {}
    for name, (inter, intra) in rows.items():
        ib_s, nvl_s = inter * fp8_row * 1000 / IB, intra * fp8_row * 1000 / NVLINK
        model_us[name] = (max(ib_s, nvl_s) * 1e6, (ib_s + nvl_s) * 1e6)
        seq = f"{model_us[name][1]:>13.1f}" if name.startswith("two") else f"{'':>13}"
        print(f"  {name:<26}{inter:>14.3f}{intra:>15.3f}{inter * fp8_row / 1024:>11.1f}{model_us[name][0]:>10.1f}{seq}")

    bw = {"inter": a.ib, "intra": a.ib * NVLINK / IB}
    print(f"== measured: 8 gloo processes (2 nodes x 4), {a.measure_tokens} tokens/rank, dim {a.measure_dim} BF16, "
          f"sleep bytes/bw at IB {a.ib / 1e6:.0f} MB/s : NVLink {bw['intra'] / 1e6:.0f} MB/s, median of {a.iters}")
    meas = {}
    # BF16 only: on CPU the float8 casts cost more than the simulated link time they save
    for kind, fp8 in (("flat", False), ("two_hop", False)):
        r = run_ranks(_measure, 8, kind, fp8, a.measure_tokens, a.measure_dim, a.iters, bw, timeout=600)
        meas[(kind, fp8)] = r[0]["time"], sum(x["inter_bytes"] for x in r) / (8 * a.measure_tokens)
        print(f"  {kind + (' fp8' if fp8 else ''):<14} dispatch+combine {meas[(kind, fp8)][0] * 1e3:8.1f} ms   "
              f"inter-node {meas[(kind, fp8)][1] / 1024:6.2f} KB/token (dispatch)")

    print("== ratios")
    f, t = rows["flat (no node limit)"][0], rows["two-hop + node limit"][0]
    print(f"  inter-node copies per token, flat / two-hop+node-limit (EP64): {f:.2f} / {t:.2f} = {f / t:.2f}x")
    print(f"  inter-node copies per token, flat+node-limit / two-hop+node-limit (EP64): "
          f"{rows['flat + node limit'][0] / t:.2f}x")
    f_us, t_us = model_us["flat (no node limit)"][0], model_us["two-hop + node limit"]
    print(f"  modelled dispatch time, flat / two-hop+node-limit (EP64): {f_us / t_us[0]:.2f}x pipelined, "
          f"{f_us / t_us[1]:.2f}x hops in sequence")
    print(f"  measured dispatch+combine, flat / two-hop (2x4, BF16): "
          f"{meas[('flat', False)][0] / meas[('two_hop', False)][0]:.2f}x")
    print(f"  measured inter-node dispatch bytes per token, flat / two-hop (2x4): "
          f"{meas[('flat', False)][1] / meas[('two_hop', False)][1]:.2f}x")


if __name__ == "__main__":
    main()
