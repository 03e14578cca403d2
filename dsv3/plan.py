"""Memory and throughput planner: ``python -m dsv3.plan CONFIG --gpus N --gpu h800|h100 [--pp --ep --dp]``.

Per GPU: BF16 parameters (×2 under DualPipe, which keeps two stages per rank), FP32 gradients,
ZeRO-1-sharded FP32 master weights and AdamW moments (dense state over DP, expert state over the
expert-data-parallel group DP/EP), and activations for the schedule's in-flight micro-batches with the
report's recomputation (§3.2.3) and FP8 activation caching (§3.3). Step time from FLOPs at cited GEMM
rates plus the exposed part of the all-to-all at cited bandwidths plus the pipeline bubble (SPEC §4).
Every rate used is printed with its source. It is a model: its assumptions are listed in ``ASSUMPTIONS``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from dsv3.config import Config, ConfigError, load_config
from dsv3.errors import UserError
from dsv3.params import count_params

GB = 1024 ** 3

# Cited rates (SPEC §5–6). GEMM rates are DeepGEMM's measured FP8 range on H800 (1.0–1.5 PFLOPS at large
# shapes); we take its low end, 1.0 PFLOPS, for every FP8 GEMM and the same fraction of peak for BF16.
HARDWARE = {
    "h800": dict(fp8_peak=1979e12, bf16_peak=989e12, fp8_gemm=1000e12, ib=45e9, nvlink=155e9, hbm=80,
                 source="FP8 GEMM 1.0 PFLOPS: DeepGEMM H800 (low end of 1.0-1.5 PFLOPS); IB 45 GB/s and "
                        "NVLink 155 GB/s: DeepEP measured 43-58 / 153-158 GB/s; peaks: H800 SXM datasheet"),
    "h100": dict(fp8_peak=1979e12, bf16_peak=989e12, fp8_gemm=1000e12, ib=45e9, nvlink=155e9, hbm=80,
                 source="as H800 (same SM count and peak; DeepEP/DeepGEMM rates measured on H800 are used; "
                        "H100's faster NVLink is not credited)"),
}

ASSUMPTIONS = [
    "layers split evenly over PP stages; a DualPipe rank holds two stages (its own and the mirror one); "
    "the busiest rank also holds the embedding, the head and the MTP module",
    "BF16 weights for compute, FP32 gradients, ZeRO-1 FP32 master + moments sharded over the data-parallel group "
    "(experts: over DP/EP)",
    "activations per token per layer: BF16 block input; c_Q, c_KV, k_rope and the attention output in BF16; "
    "softmax statistics FP32; K dispatched FP8 token copies and their FP8 SwiGLU inputs; RMSNorm, MLA up-projections "
    "(q, k, v) and SwiGLU outputs recomputed (report §3.2.3)",
    "only GEMMs, all-to-all and the bubble take time: no kernel-launch, elementwise, router or permutation "
    "overheads, so the step time is a lower bound",
    "compute: linear-layer FLOPs at the FP8 GEMM rate, core attention at the same fraction of BF16 peak",
    "all-to-all per MoE layer: dispatch FP8 (+1/128 scales), combine BF16, once per reached node over IB "
    "(≤ topk_group nodes), forward and backward; hidden under DualPipe's paired F&B except what exceeds compute",
    "DualPipe bubble (PP/2−1)(F&B + B − 3W) with B = 2F, W = F; 1F1B (PP−1)(F+B)",
]


@dataclass
class Plan:
    params_per_gpu: float
    param_bytes: float
    grad_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    total_bytes: float
    step_time: float
    tokens_per_s_per_gpu: float
    mfu: float
    gpu_hours_per_trillion: float
    exposed_comm: float
    bubble: float


def stage_params(cfg: Config, pp: int, ep: int, copies: int) -> tuple[float, float]:
    """(dense, expert) parameters on the busiest rank: L/pp layers per stage × `copies` stages
    (DualPipe keeps 2), plus the embedding, the head and the MTP module (which sit on the first and
    last stages under DualPipe; under 1F1B a tied embedding copy sits with MTP), experts divided by EP."""
    m = cfg.model
    c = count_params(m)
    per_expert_layer = 3 * m.dim * m.moe.moe_inter_dim * m.moe.n_routed_experts
    main_moe_layers = m.n_layers - m.n_dense_layers
    embed = head = m.vocab_size * m.dim
    layer_dense = c.total - embed - head - m.dim - per_expert_layer * main_moe_layers
    mtp_dense = c.mtp - per_expert_layer * m.mtp.depth
    dense = layer_dense / pp * copies + embed + head + mtp_dense
    expert = (per_expert_layer * main_moe_layers / pp * copies + per_expert_layer * m.mtp.depth) / ep
    return dense, expert


def activation_bytes_per_token_layer(cfg: Config) -> float:
    m, a, moe = cfg.model, cfg.model.mla, cfg.model.moe
    attn = (2 * m.dim + 2 * (a.q_lora_rank or 0) + 2 * (a.kv_lora_rank + a.qk_rope_head_dim)
            + 2 * a.n_heads * a.v_head_dim + 4 * a.n_heads)
    fp8_row = lambda n: n + 4 * math.ceil(n / 128)  # noqa: E731  FP8 values + one FP32 scale per 128
    ffn = (2 * m.dim + moe.n_activated_experts * (fp8_row(m.dim) + fp8_row(2 * moe.moe_inter_dim))
           + fp8_row(m.dim) + fp8_row(2 * moe.n_shared_experts * moe.moe_inter_dim))
    return attn + ffn


def plan(cfg: Config, gpus: int, gpu: str, pp: int, ep: int, dp: int | None = None,
         batch_sequences: int | None = None, micro_batch: int = 1) -> Plan:
    hw = HARDWARE[gpu]
    if dp is None:
        dp = gpus // pp
    if pp * dp != gpus:
        raise ConfigError(f"--gpus {gpus} must equal pp × dp = {pp} × {dp}")
    if dp % ep:
        raise ConfigError(f"ep={ep} must divide dp={dp} (experts are carved out of the data-parallel group)")
    m, t = cfg.model, cfg.train
    dualpipe = cfg.parallel.pp_schedule in ("dualpipe", "dualpipev") and pp > 1
    copies = 2 if cfg.parallel.pp_schedule == "dualpipe" and pp > 1 else 1
    dense, expert = stage_params(cfg, pp, ep, copies)
    n_params = dense + expert
    param_b, grad_b = 2 * n_params, 4 * n_params
    moment_bytes = 2 if t.bf16_moments else 4
    state = 4 + 2 * moment_bytes
    opt_b = state * dense / dp + state * expert / (dp // ep)
    seq = cfg.data.seq_len
    layers_per_stage = (m.n_layers + m.mtp.depth) / pp
    in_flight = pp + 1 if dualpipe else pp   # SPEC §4 activation column, micro-batch × stage units
    act_b = activation_bytes_per_token_layer(cfg) * seq * micro_batch * layers_per_stage * in_flight
    # ---- time
    counts = count_params(m)
    linear_flops = 6.0 * (counts.activated_no_embed + (counts.mtp - 3 * m.dim * m.moe.moe_inter_dim
                                                        * (m.moe.n_routed_experts - m.moe.n_activated_experts)))
    attn_flops = 3 * (m.n_layers + m.mtp.depth) * m.mla.n_heads * (
        m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim + m.mla.v_head_dim) * seq
    eff = hw["fp8_gemm"] / hw["fp8_peak"]
    sec_per_token = linear_flops / hw["fp8_gemm"] + attn_flops / (hw["bf16_peak"] * eff)
    batch = batch_sequences or t.global_batch
    tokens_per_gpu = batch * seq / gpus * pp  # each pipeline replica's GPU sees its DP share, for its stage only
    compute = sec_per_token * tokens_per_gpu / pp
    nodes = min(m.moe.topk_group, m.moe.n_group) if m.moe.n_group > 1 else 1
    a2a_bytes = (fp8_b := m.dim + 4 * math.ceil(m.dim / 128)) * nodes + 2 * m.dim * nodes
    moe_layers_rank = (m.n_layers - m.n_dense_layers + m.mtp.depth) / pp
    comm = 2 * a2a_bytes * moe_layers_rank * tokens_per_gpu / hw["ib"]
    exposed = max(0.0, comm - compute) if dualpipe else comm
    chunks = max(1, batch // dp // micro_batch)
    F = compute / chunks / 3
    bubble = (pp / 2 - 1) * 2 * F if dualpipe else (pp - 1) * 3 * F
    step = compute + exposed + bubble
    tok_s = batch * seq / step / gpus
    mfu = tok_s * (linear_flops + attn_flops) / hw["bf16_peak"]
    return Plan(n_params, param_b, grad_b, opt_b, act_b, param_b + grad_b + opt_b + act_b, step, tok_s, mfu,
                1e12 / tok_s / 3600, exposed, bubble)


def _layout(args, cfg: Config) -> tuple[int, int, int]:
    """(pp, ep, dp) from the flags and the config, each checked: one ConfigError naming the flag."""
    for flag in ("gpus", "pp", "ep", "dp", "batch_sequences"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
    pp = args.pp if args.pp is not None else cfg.parallel.pp
    ep = args.ep if args.ep is not None else cfg.parallel.ep
    if args.dp is None and args.gpus % pp:
        raise ConfigError(f"--gpus {args.gpus} is not a multiple of pp={pp} (pipeline stages): change --gpus or --pp")
    dp = args.dp if args.dp is not None else args.gpus // pp
    if pp * dp != args.gpus:
        raise ConfigError(f"--gpus {args.gpus} must equal pp × dp = {pp} × {dp}")
    if dp % ep:
        raise ConfigError(f"ep={ep} must divide dp={dp} (experts are carved out of the data-parallel group)")
    return pp, ep, dp


def main(argv=None) -> int:
    from dsv3.hf import OneLineParser
    ap = OneLineParser(prog="python -m dsv3.plan", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all (= pp × dp)")
    ap.add_argument("--gpu", choices=sorted(HARDWARE), default="h800")
    ap.add_argument("--pp", type=int, help="pipeline stages (default: the config's parallel.pp)")
    ap.add_argument("--ep", type=int, help="expert-parallel size, a divisor of dp (default: the config's parallel.ep)")
    ap.add_argument("--dp", type=int, help="data-parallel replicas (default: gpus / pp)")
    ap.add_argument("--batch-sequences", type=int, help="global batch in sequences (default: the config's)")
    try:
        args = ap.parse_args(argv)
        cfg = load_config(args.config)
        pp, ep, dp = _layout(args, cfg)
        p = plan(cfg, args.gpus, args.gpu, pp, ep, dp, args.batch_sequences)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"layout: {args.gpus} × {args.gpu.upper()}  PP{pp} × DP{dp}, EP{ep} (expert-DP {dp // ep}), "
          f"schedule {cfg.parallel.pp_schedule}, ZeRO-1")
    print(f"parameters per GPU: {p.params_per_gpu / 1e9:.2f}B")
    print(f"memory per GPU: params {p.param_bytes / GB:.1f} GiB | grads {p.grad_bytes / GB:.1f} GiB | "
          f"optimizer {p.optimizer_bytes / GB:.1f} GiB | activations {p.activation_bytes / GB:.1f} GiB | "
          f"total {p.total_bytes / GB:.1f} GiB of {HARDWARE[args.gpu]['hbm']} GB")
    print(f"step time {p.step_time:.1f} s (bubble {p.bubble:.1f} s, exposed all-to-all {p.exposed_comm:.1f} s) | "
          f"{p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU | MFU {100 * p.mfu:.1f}% of BF16 peak")
    hours = p.gpu_hours_per_trillion
    print(f"GPU-hours per trillion tokens: {hours / 1e3:,.0f}K (report: 180K)")
    print(f"pre-training 14.8T tokens: {14.8 * hours / 1e6:.3f}M GPU-hours (report: 2.664M)")
    print(f"rates: {HARDWARE[args.gpu]['source']}")
    print("assumptions:\n  - " + "\n  - ".join(ASSUMPTIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
