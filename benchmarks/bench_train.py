"""A whole training step (forward, backward, AdamW) of our Transformer against transformers'
DeepseekV3ForCausalLM on identical weights (ours mapped onto theirs below), MTP and the balance loss
off, same tokens, same optimizer settings. The small_moe shape (configs/small_moe.yaml) by default.

    python benchmarks/bench_train.py [--config configs/small_moe.yaml | configs/hf_tiny.yaml] [--steps 8]
        [--threads N] [--dtype auto|bf16|fp32] [--clock wall|cpu] [--profile]

Each side trains as its stack does: ours is dsv3.model.transformer.Transformer with dsv3.training.optim's AdamW (torch's
fused kernel), transformers' model with torch.optim.AdamW(fused=True) (the transformers Trainer's
default optimizer on torch ≥ 2.8), both with weight decay on matrices only. ``--dtype auto`` (default)
is the trainer's rule (dsv3.training.runtime.choose_dtype): BF16 where the CPU has native BF16 GEMMs, FP32
elsewhere; ``bf16`` runs both under torch.autocast(bfloat16) with FP32 master weights (the Trainer's
``bf16=True``); ``fp32`` runs both in FP32. transformers runs with its faster settings: sdpa attention
and the grouped_mm experts backend.

The CPU is described as its kernels run: ATen's dispatch level and oneDNN's ISA cap
(``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` emulate an AVX2-only CPU
on a wider one), and that description is printed beside every ratio. Steps are interleaved (a noisy
neighbour slows both alike); ``--clock cpu`` times them in process CPU time (single-threaded runs on a
shared machine), ``wall`` (default) in wall time.

Prints each side's loss on every step (same weights and tokens: they agree to the precision's rounding;
the step-0 loss and gradient norm are checked), tokens/s (best and median step), the ratio ours /
transformers in tokens/s (target ≥ 1.5), and the roofline share: the step's FLOP/s as a share of this
CPU's matmul rate in the same dtype, measured in the same run on the step's own GEMM (M, N, K) list
(FLOP-weighted, best of 5, same threads; ``roofline``). ``--profile`` adds a torch.profiler breakdown of
one step of each side by where the time goes (``profile_breakdown``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from contextlib import nullcontext

import torch

from dsv3.config import load_config
from dsv3.model.transformer import Transformer
from dsv3.training.optim import build_optimizer
from dsv3.training.runtime import choose_dtype
from roofline import bench_cpu, isa_label, profile_breakdown, roofline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hf_model(ours: Transformer, experts_impl: str, attn_impl: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    c, mla, moe = ours.cfg, ours.cfg.mla, ours.cfg.moe
    cfg = DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.inter_dim,
        moe_intermediate_size=moe.moe_inter_dim, num_hidden_layers=c.n_layers, num_attention_heads=mla.n_heads,
        num_key_value_heads=mla.n_heads, n_shared_experts=moe.n_shared_experts, n_routed_experts=moe.n_routed_experts,
        routed_scaling_factor=moe.routed_scaling_factor, kv_lora_rank=mla.kv_lora_rank, q_lora_rank=mla.q_lora_rank,
        qk_rope_head_dim=mla.qk_rope_head_dim, qk_nope_head_dim=mla.qk_nope_head_dim, v_head_dim=mla.v_head_dim,
        n_group=moe.n_group, topk_group=moe.topk_group, num_experts_per_tok=moe.n_activated_experts,
        first_k_dense_replace=c.n_dense_layers, norm_topk_prob=moe.norm_topk_prob, rms_norm_eps=c.norm_eps,
        max_position_embeddings=c.max_seq_len, rope_theta=mla.rope_theta, rope_interleave=True,
        tie_word_embeddings=False, attention_bias=False, experts_implementation=experts_impl,
        attn_implementation=attn_impl)
    assert mla.rope_scaling is None, "the benchmark maps un-scaled RoPE only"
    ref = DeepseekV3ForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": ours.embed.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.head.weight}
    for i, blk in enumerate(ours.layers):
        p, a = f"model.layers.{i}.", blk.attn
        sd |= {p + "input_layernorm.weight": blk.attn_norm.weight, p + "post_attention_layernorm.weight": blk.ffn_norm.weight,
               p + "self_attn.kv_a_proj_with_mqa.weight": a.wkv_a.weight, p + "self_attn.kv_a_layernorm.weight": a.kv_norm.weight,
               p + "self_attn.kv_b_proj.weight": a.wkv_b.weight, p + "self_attn.o_proj.weight": a.wo.weight}
        if mla.q_lora_rank is None:
            sd[p + "self_attn.q_proj.weight"] = a.wq.weight
        else:
            sd |= {p + "self_attn.q_a_proj.weight": a.wq_a.weight, p + "self_attn.q_a_layernorm.weight": a.q_norm.weight,
                   p + "self_attn.q_b_proj.weight": a.wq_b.weight}
        f = blk.ffn
        if i < c.n_dense_layers:
            sd |= {p + "mlp.gate_proj.weight": f.w1.weight, p + "mlp.up_proj.weight": f.w3.weight,
                   p + "mlp.down_proj.weight": f.w2.weight}
        else:
            sd |= {p + "mlp.gate.weight": f.gate.weight, p + "mlp.gate.e_score_correction_bias": f.gate.e_score_correction_bias,
                   p + "mlp.experts.gate_up_proj": torch.cat([f.experts.w1, f.experts.w3], dim=1),
                   p + "mlp.experts.down_proj": f.experts.w2}
            if f.shared_experts is not None:
                s = f.shared_experts
                sd |= {p + "mlp.shared_experts.gate_proj.weight": s.w1.weight,
                       p + "mlp.shared_experts.up_proj.weight": s.w3.weight,
                       p + "mlp.shared_experts.down_proj.weight": s.w2.weight}
    missing, unexpected = ref.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
    return ref


def grad_norm(model) -> float:
    return sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "small_moe.yaml"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=0, help="0 = train.micro_batch_size")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--experts", default="grouped_mm", choices=["grouped_mm", "eager"], help="transformers experts backend")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: BF16 where the CPU has native BF16 GEMMs, else FP32 (dsv3.training.runtime.choose_dtype)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (1 thread)")
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler breakdown of one step of each")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = bench_cpu()
    dtype, why = choose_dtype(args.dtype, torch.device("cpu"), cpu)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = load_config(args.config, ["model.mtp.depth=0", "model.moe.aux_loss_alpha=0"])
    B, T = args.batch or cfg.train.micro_batch_size, cfg.data.seq_len
    torch.manual_seed(0)
    ours = Transformer(cfg.model).train()
    ref = hf_model(ours, args.experts, "sdpa").train()
    tc = cfg.train
    ref_groups = [dict(params=[p for p in ref.parameters() if p.ndim >= 2], weight_decay=tc.weight_decay),
                  dict(params=[p for p in ref.parameters() if p.ndim < 2], weight_decay=0.0)]
    runs = {"ours": (ours, build_optimizer(ours, tc)),
            "transformers": (ref, torch.optim.AdamW(ref_groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                                    fused=True))}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen) for _ in range(args.steps + 2)]
    norms = {}

    def hf_step(seq: torch.Tensor, norm: bool = False) -> float:
        model, opt = runs["transformers"]
        # shift_labels: targets already shifted, so both models see T inputs and T targets (labels only
        # switches the loss on; with shift_labels given it is not read)
        with autocast():
            loss = model(input_ids=seq[:, :-1], labels=seq[:, 1:], shift_labels=seq[:, 1:].contiguous(), use_cache=False).loss
        loss.backward()
        if norm:
            norms["transformers"] = grad_norm(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def ours_step(seq: torch.Tensor, norm: bool = False) -> float:
        model, opt = runs["ours"]
        with autocast():
            loss = model(seq[:, :-1], labels=seq[:, 1:]).loss
        loss.backward()
        if norm:
            norms["ours"] = grad_norm(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    steps = {"ours": ours_step, "transformers": hf_step}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    isa = isa_label(cpu)
    print(f"shape: {cfg.model.n_layers} layers ({cfg.model.n_dense_layers} dense), dim {cfg.model.dim}, "
          f"{cfg.model.moe.n_routed_experts} experts top-{cfg.model.moe.n_activated_experts} "
          f"(groups {cfg.model.moe.n_group}/{cfg.model.moe.topk_group}), vocab {cfg.model.vocab_size}, "
          f"batch {B}×{T}; torch threads {torch.get_num_threads()}; transformers experts: {args.experts}; "
          f"{dtype.upper()} ({why}); {args.clock} clock")
    print(isa)
    for i, seq in enumerate(batches):           # interleaved, alternating who goes first: a noisy neighbour slows both alike
        for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
            t0 = clock()
            losses[name].append(steps[name](seq, norm=i == 0))
            if i >= 2:
                times[name].append(clock() - t0)
        print(f"step {i}: loss ours {losses['ours'][-1]:.6f}  transformers {losses['transformers'][-1]:.6f}")
    best = {name: min(t) for name, t in times.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    rf = roofline(lambda: ours_step(batches[0]), clock)      # each GEMM timed in the dtype it ran in
    for name in steps:
        share = f"  roofline share {rf['step_flop'] / best[name] / rf['rate']:6.1%}" if rf else ""
        print(f"{name:12s} best {best[name] * 1e3:8.1f} ms/step ({B * T / best[name]:8,.0f} tokens/s)  "
              f"median {med[name] * 1e3:8.1f} ms{share}")
    if rf:
        print(f"roofline: step {rf['step_flop'] / 1e9:.2f} GFLOP (GEMMs {rf['gemm_flop'] / 1e9:.2f} in {rf['calls']} calls "
              f"of {rf['shapes']} shapes + attention core {rf['attn_flop'] / 1e9:.2f}); this CPU's {dtype.upper()} "
              f"matmul rate on that GEMM list (each GEMM in its own dtype) {rf['rate'] / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads, best of 5)")
        floor = rf["step_flop"] / rf["rate"]     # every FLOP at the GEMM list's rate, nothing else
        print(f"ceiling: a step of only its GEMMs and attention FLOP at that rate would take {floor * 1e3:.1f} ms: "
              f"at most {best['transformers'] / floor:.2f}x transformers' best step")
    d0 = abs(losses["ours"][0] - losses["transformers"][0])
    dn = abs(norms["ours"] - norms["transformers"]) / norms["transformers"]
    dk = max(abs(a - b) / abs(b) for a, b in zip(losses["ours"][:10], losses["transformers"][:10]))
    print(f"step-0 loss |diff| = {d0:.2e}; step-0 grad norm rel diff = {dn:.2e}; "
          f"first {min(10, len(batches))} losses max rel diff = {dk:.2e}")
    if dtype == "fp32":
        ok = d0 <= 1e-5 and dn <= 1e-5 and dk <= 1e-4
        print("accuracy (FP32: step-0 loss 1e-5, grad norm 1e-5 rel, first 10 losses 1e-4 rel): "
              + ("ok" if ok else "FAILED"))
    if args.profile:
        for name, fn in steps.items():
            cats, total = profile_breakdown(lambda: fn(batches[1]))
            print(f"profile {name} (one step, {total * 1e3:.0f} ms under the profiler):")
            for cat, t in sorted(cats.items(), key=lambda kv: -kv[1]):
                print(f"  {cat:34s} {t * 1e3:8.1f} ms  {t / total:6.1%}")
    print(f"ratio (ours / transformers tokens/s): {med['transformers'] / med['ours']:.2f}x median, "
          f"{best['transformers'] / best['ours']:.2f}x best — {dtype.upper()}, {isa}")


if __name__ == "__main__":
    main()
