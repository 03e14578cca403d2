"""A whole training step (forward, backward, AdamW) of our Transformer against transformers'
DeepseekV3ForCausalLM on identical weights (ours mapped onto theirs below), MTP and the balance loss
off, same tokens, same optimizer settings. The small_moe shape (configs/small_moe.yaml) by default.

    python benchmarks/bench_train.py [--config configs/small_moe.yaml] [--steps 8] [--threads N] [--dtype bf16|fp32]

Each side trains as its stack does: ours is dsv3.model.Transformer with dsv3.optim's AdamW (torch's
fused kernel), transformers' model with torch.optim.AdamW(fused=True) (the transformers Trainer's
default optimizer on torch ≥ 2.8), both with weight decay on matrices only. ``--dtype bf16`` (default)
runs both under torch.autocast(bfloat16) with FP32 master weights (the Trainer's ``bf16=True``);
``fp32`` runs both in FP32. transformers runs with its faster settings: sdpa attention and the
grouped_mm experts backend.

Prints each side's loss on every step (same weights and tokens: they agree to the precision's rounding),
tokens/s, and last the ratio ours / transformers in tokens/s (target ≥ 1.5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from contextlib import nullcontext

import torch

from dsv3.config import load_config
from dsv3.model import Transformer
from dsv3.optim import build_optimizer

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "small_moe.yaml"))
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=0, help="0 = train.micro_batch_size")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--experts", default="grouped_mm", choices=["grouped_mm", "eager"], help="transformers experts backend")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast BF16 (FP32 masters) or FP32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else nullcontext
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen) for _ in range(args.steps + 2)]

    def hf_step(seq: torch.Tensor) -> float:
        model, opt = runs["transformers"]
        # shift_labels: targets already shifted, so both models see T inputs and T targets (labels only
        # switches the loss on; with shift_labels given it is not read)
        with autocast():
            loss = model(input_ids=seq[:, :-1], labels=seq[:, 1:], shift_labels=seq[:, 1:].contiguous(), use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def ours_step(seq: torch.Tensor) -> float:
        model, opt = runs["ours"]
        with autocast():
            loss = model(seq[:, :-1], labels=seq[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    steps = {"ours": ours_step, "transformers": hf_step}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    print(f"shape: {cfg.model.n_layers} layers ({cfg.model.n_dense_layers} dense), dim {cfg.model.dim}, "
          f"{cfg.model.moe.n_routed_experts} experts top-{cfg.model.moe.n_activated_experts}, vocab {cfg.model.vocab_size}, "
          f"batch {B}×{T}; torch threads {torch.get_num_threads()}; transformers experts: {args.experts}; {args.dtype}")
    for i, seq in enumerate(batches):           # interleaved: a noisy neighbour slows both alike
        for name, fn in steps.items():
            t0 = time.perf_counter()
            losses[name].append(fn(seq))
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
        print(f"step {i}: loss ours {losses['ours'][-1]:.6f}  transformers {losses['transformers'][-1]:.6f}")
    tps = {name: B * T / statistics.median(t) for name, t in times.items()}
    for name in steps:
        print(f"{name:12s} {statistics.median(times[name]) * 1e3:8.1f} ms/step  {tps[name]:10,.0f} tokens/s")
    print(f"step-0 loss |diff| = {abs(losses['ours'][0] - losses['transformers'][0]):.2e}")
    print(f"ratio (ours / transformers tokens/s): {tps['ours'] / tps['transformers']:.2f}x")


if __name__ == "__main__":
    main()
