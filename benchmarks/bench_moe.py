"""One MoE layer, forward + backward: ours (dsv3.model.moe.MoE, grouped GEMM) against transformers'
DeepseekV3MoE with its two experts backends ("eager": a Python loop over hit experts; "grouped_mm":
torch grouped GEMM), same weights, same tokens, the small_moe shape (configs/small_moe.yaml).

    python benchmarks/bench_moe.py [--config configs/small_moe.yaml] [--tokens 2048] [--iters 20]
        [--dtype auto|fp32|bf16] [--clock wall|cpu]

Prints the time per step of each (best and median of interleaved iterations), checks that the outputs
agree, the roofline share of each (FLOP/s over this CPU's matmul rate on ours' own GEMM list:
benchmarks/roofline.py), and last the ratio of the faster transformers backend's time to ours (> 1 = ours
faster; target ≥ 1.2) with the CPU's ISA as its kernels run (an AVX2 emulation is named as such).
``--dtype auto`` (default) follows the trainer's rule (dsv3.training.runtime.choose_dtype).
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import os
import statistics
import time

import torch

from dsv3.config import load_config
from dsv3.model.moe import MoE
from dsv3.training.runtime import choose_dtype
from roofline import bench_cpu, isa_label, roofline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_moe(dim: int, moe_cfg, backend: str, ours: MoE):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    cfg = DeepseekV3Config(hidden_size=dim, n_routed_experts=moe_cfg.n_routed_experts,
                           num_experts_per_tok=moe_cfg.n_activated_experts, n_group=moe_cfg.n_group,
                           topk_group=moe_cfg.topk_group, routed_scaling_factor=moe_cfg.routed_scaling_factor,
                           norm_topk_prob=moe_cfg.norm_topk_prob, moe_intermediate_size=moe_cfg.moe_inter_dim,
                           n_shared_experts=moe_cfg.n_shared_experts, experts_implementation=backend)
    ref = DeepseekV3MoE(cfg)
    with torch.no_grad():
        ref.gate.weight.copy_(ours.gate.weight)
        ref.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        ref.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        ref.experts.down_proj.copy_(ours.experts.w2)
        ref.shared_experts.gate_proj.weight.copy_(ours.shared_experts.w1.weight)
        ref.shared_experts.up_proj.weight.copy_(ours.shared_experts.w3.weight)
        ref.shared_experts.down_proj.weight.copy_(ours.shared_experts.w2.weight)
    return ref


AUTOCAST = nullcontext


def step(module, x, g):
    module.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    with AUTOCAST():
        y = module(xi)
    y.backward(g.to(y.dtype))
    return y.detach().float(), xi.grad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "small_moe.yaml"))
    ap.add_argument("--tokens", type=int, default=0, help="0 = micro_batch_size × seq_len of the config")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16: all sides under torch.autocast(bfloat16); auto: BF16 only where the CPU has native BF16 GEMMs")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (1 thread)")
    args = ap.parse_args()
    cpu = bench_cpu()
    args.dtype, why = choose_dtype(args.dtype, torch.device("cpu"), cpu)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    global AUTOCAST
    if args.dtype == "bf16":
        AUTOCAST = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["model.moe.aux_loss_alpha=0"])
    m = cfg.model
    n_tok = args.tokens or cfg.train.micro_batch_size * cfg.data.seq_len
    torch.manual_seed(0)
    ours = MoE(m.dim, m.moe).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, m.init_std * 10)
        ours.gate.e_score_correction_bias.uniform_(0, 0.01)
    impls = {"ours": ours, "hf_eager": hf_moe(m.dim, m.moe, "eager", ours),
             "hf_grouped_mm": hf_moe(m.dim, m.moe, "grouped_mm", ours)}
    x = torch.randn(1, n_tok, m.dim)
    g = torch.randn(1, n_tok, m.dim)

    autocast, AUTOCAST = AUTOCAST, nullcontext
    ref_y, ref_dx = step(ours, x, g)                 # FP32: the reference for every side
    AUTOCAST = autocast

    def rel(y, dx):
        return max(((y - ref_y).norm() / ref_y.norm()).item(), ((dx - ref_dx).norm() / ref_dx.norm()).item())

    if args.dtype == "fp32":
        for name in ("hf_eager", "hf_grouped_mm"):
            y, dx = step(impls[name], x, g)
            err = max((y - ref_y).abs().max().item(), (dx - ref_dx).abs().max().item())
            print(f"{name}: max |diff| vs ours (output, input grad) = {err:.2e}")
            assert err < 1e-4, name
    else:
        # relative to the FP32 result: ours keeps its router in FP32 under autocast; transformers' router
        # GEMM runs in BF16 there, so near-tie tokens pick other experts and it drifts further
        err = rel(*step(ours, x, g))
        print(f"ours BF16 vs FP32: relative |diff| (output, input grad) = {err:.2e}")
        assert err < 2e-2
        for name in ("hf_eager", "hf_grouped_mm"):
            print(f"{name} BF16 vs FP32: relative |diff| = {rel(*step(impls[name], x, g)):.2e}")

    times = {name: [] for name in impls}
    for name, mod in impls.items():          # warm-up
        for _ in range(3):
            step(mod, x, g)
    for _ in range(args.iters):              # interleaved so a noisy neighbour hits all three alike
        for name, mod in impls.items():
            t0 = clock()
            step(mod, x, g)
            times[name].append(clock() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    rf = roofline(lambda: step(ours, x, g), clock)      # each GEMM timed in the dtype it ran in
    print(f"shape: tokens {n_tok}, dim {m.dim}, {m.moe.n_routed_experts} experts × {m.moe.moe_inter_dim}, "
          f"top-{m.moe.n_activated_experts}, groups {m.moe.n_group}/{m.moe.topk_group}, "
          f"{m.moe.n_shared_experts} shared; torch threads {torch.get_num_threads()}; {args.dtype.upper()} ({why}); "
          f"{args.clock} clock")
    isa = isa_label(cpu)
    print(isa)
    for name in med:
        share = f"  roofline share {rf['step_flop'] / best[name] / rf['rate']:6.1%}" if rf else ""
        print(f"{name:14s} fwd+bwd best {best[name] * 1e3:8.2f} ms  ({n_tok / best[name]:,.0f} tokens/s)  "
              f"median {med[name] * 1e3:8.2f} ms{share}")
    if rf:
        print(f"roofline: {rf['gemm_flop'] / 1e9:.2f} GFLOP in {rf['calls']} GEMMs of {rf['shapes']} shapes; this CPU's "
              f"{args.dtype.upper()} matmul rate on that list {rf['rate'] / 1e9:.1f} GFLOP/s (best of 5, same threads)")
    hf_med, hf_best = min(med["hf_eager"], med["hf_grouped_mm"]), min(best["hf_eager"], best["hf_grouped_mm"])
    print(f"ratio (faster transformers backend / ours): {hf_med / med['ours']:.2f}x median, "
          f"{hf_best / best['ours']:.2f}x best — {args.dtype.upper()}, {isa}")


if __name__ == "__main__":
    main()
