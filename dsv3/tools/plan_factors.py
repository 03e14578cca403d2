"""The planner's time side: one step of the busiest pipeline rank, built from the model's GEMM shapes,
its memory-bound traffic and its communication, each priced by a sourced figure (dsv3/tools/plan_sources.py,
dsv3/tools/hardware.py). ``step(ctx, on)`` prices a step with the factors in ``on`` switched to their
expected value; with none on it is the ideal bound: every GEMM at the dense peak of its precision,
the mean rank, all-to-all at the NIC's line rate, no memory-bound work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from dsv3.config import Config
from dsv3.tools.hardware import GPU, GPUS
from dsv3.tools import plan_sources as src
from dsv3.tools.plan_memory import FP8_ROW, rank_stages
from parallel.schedules import get_schedule
from parallel.stage_cut import stage_bounds

FACTORS = [  # (key, label) in the order they are applied
    ("gemm", "GEMM efficiency by shape (DeepGEMM tables; BF16 GEMMs at the same fraction of the BF16 peak)"),
    ("attn", "attention core at FlashMLA's rate"),
    ("recompute", "MLA up-projections (wq_b, wkv_b) and attention core forward recomputed in backward"),
    ("sms", "SMs given to communication while it overlaps compute"),
    ("membound", "memory-bound work at the achievable HBM rate"),
    ("imbalance", "busiest pipeline rank (uneven cut, embedding / head / MTP)"),
    ("a2a", "expert all-to-all at DeepEP's bandwidth, EP stragglers at MaxVio"),
    ("p2p", "pipeline point-to-point on the fill and drain"),
    ("zero", "ZeRO-1 reduce-scatter + all-gather and the optimizer step"),
]
GPUS_PER_NODE = 8


@dataclass
class Ctx:
    cfg: Config
    gpu: GPU
    pp: int
    dp: int
    ep: int
    micro_batch: int
    global_batch: int
    maxvio: float

    @property
    def tokens(self) -> int:           # one micro-batch
        return self.micro_batch * self.cfg.data.seq_len

    @property
    def chunks(self) -> int:           # micro-batches per pipeline per step
        return max(1, self.global_batch // self.dp // self.micro_batch)


def _nearest(table: dict, key: tuple) -> tuple[tuple, float]:
    """The table row nearest ``key`` in log distance over every coordinate (the rule; no interpolation)."""
    best = min(table, key=lambda r: sum(abs(math.log(max(a, 1) / b)) for a, b in zip(key, r)))
    return best, table[best]


def gemm_tflops(ctx: Ctx, m: int, n: int, k: int, fp8: bool, groups: int = 0) -> float:
    """Expected TFLOPS of one GEMM: DeepGEMM's H800 figure for the nearest shape (dense rows keyed by the
    largest table M ≤ m), scaled to this GPU's FP8 peak, halved with the peak ratio for BF16."""
    t = _h800_tflops(m, n, k, groups) * ctx.gpu.fp8_dense_tflops / GPUS["h800"].fp8_dense_tflops
    return t if fp8 else t * ctx.gpu.bf16_dense_tflops / ctx.gpu.fp8_dense_tflops


@lru_cache(maxsize=None)
def _h800_tflops(m: int, n: int, k: int, groups: int) -> float:
    if groups:
        _, t = _nearest(src.DEEPGEMM_GROUPED, (groups, m, n, k))
    else:
        rows_m = sorted({r[0] for r in src.DEEPGEMM_DENSE})
        mm = max([r for r in rows_m if r <= m] or [rows_m[0]])
        sub = {r: v for r, v in src.DEEPGEMM_DENSE.items() if r[0] == mm}
        _, t = _nearest(sub, (mm, n, k))
        t *= min(1.0, m / mm)                         # below the smallest measured M: rows scale the time
    return t


def layer_gemms(ctx: Ctx, layer_id: int) -> list[tuple[str, int, int, int, bool, int]]:
    """Forward GEMMs of one Block on a micro-batch: (name, M, N, K, fp8, groups)."""
    m, a, e = ctx.cfg.model, ctx.cfg.model.mla, ctx.cfg.model.moe
    M, d, f8 = ctx.tokens, m.dim, ctx.cfg.fp8.enabled
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    kv_a = a.kv_lora_rank + a.qk_rope_head_dim
    g = []
    if a.q_lora_rank is None:
        g += [("wq", M, a.n_heads * qk, d, f8, 0), ("wkv_a", M, kv_a, d, f8, 0)]
    else:
        g += [("wq_a+wkv_a", M, a.q_lora_rank + kv_a, d, f8, 0), ("wq_b", M, a.n_heads * qk, a.q_lora_rank, f8, 0)]
    g += [("wkv_b", M, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, f8, 0),
          ("wo", M, d, a.n_heads * a.v_head_dim, f8, 0)]
    if layer_id < m.n_dense_layers:
        return g + [("w1+w3", M, 2 * m.inter_dim, d, f8, 0), ("w2", M, d, m.inter_dim, f8, 0)]
    local = e.n_routed_experts // ctx.ep
    rows = max(1, M * e.n_activated_experts * ctx.ep // e.n_routed_experts)   # per local expert
    g += [("gate", M, e.n_routed_experts, d, False, 0),
          ("experts w1+w3", rows, 2 * e.moe_inter_dim, d, f8, local), ("experts w2", rows, d, e.moe_inter_dim, f8, local)]
    if e.n_shared_experts:
        Is = e.n_shared_experts * e.moe_inter_dim
        g += [("shared w1+w3", M, 2 * Is, d, f8, 0), ("shared w2", M, d, Is, f8, 0)]
    return g


def head_gemms(ctx: Ctx) -> list[tuple[str, int, int, int, bool, int]]:
    m, M = ctx.cfg.model, ctx.tokens
    g = [("head", M, m.vocab_size, m.dim, False, 0)]
    for _ in range(m.mtp.depth):
        g += [("mtp eh_proj", M, m.dim, 2 * m.dim, False, 0), ("mtp head", M, m.vocab_size, m.dim, False, 0)]
    return g


def _gemm_time(ctx: Ctx, g, on: set) -> tuple[float, float, float]:
    """(forward, dgrad, wgrad) seconds of one forward GEMM's three passes; flops at peak when 'gemm' is off.
    The gate runs in FP32 (TF32: half the BF16 rate)."""
    name, M, N, K, fp8, groups = g
    peak = ctx.gpu.fp8_dense_tflops if fp8 else ctx.gpu.bf16_dense_tflops
    tf32 = 0.5 if name == "gate" else 1.0
    flops = 2.0 * M * N * K * max(groups, 1)
    if "gemm" not in on:
        return tuple(flops / (peak * tf32 * 1e12) for _ in range(3))
    rates = (gemm_tflops(ctx, M, N, K, fp8, groups), gemm_tflops(ctx, M, K, N, fp8, groups),
             gemm_tflops(ctx, N, K, M * max(groups, 1), fp8, 0) if groups else gemm_tflops(ctx, N, K, M, fp8))
    return tuple(flops / (r * tf32 * 1e12) for r in rates)


MLA_RECOMPUTED = ("wq_b", "wkv_b")     # the up-projections MLA's checkpoint re-runs (report §3.2.3)


def attn_flops(ctx: Ctx) -> float:
    """Forward FLOPs of the causal attention core per micro-batch: QKᵀ and PV over T/2 keys on average."""
    a, T = ctx.cfg.model.mla, ctx.cfg.data.seq_len
    return 2.0 * ctx.tokens * (T / 2) * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)


def model_flops_per_token(cfg: Config, ctx: Ctx) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per token for forward + backward: 3 × forward GEMMs and attention;
    hardware adds what train.recompute re-runs in backward: MLA's wq_b and wkv_b forwards and the attention
    core's forward (dsv3/model/mla.py checkpoints the up-projections with the core)."""
    m = cfg.model
    fwd = recompute = 0.0
    for i in list(range(m.n_layers)) + [m.n_layers + k for k in range(m.mtp.depth)]:
        for g in layer_gemms(ctx, i):
            f = 2.0 * g[1] * g[2] * g[3] * max(g[5], 1)
            fwd += f
            recompute += f if g[0] in MLA_RECOMPUTED and cfg.train.recompute else 0.0
        fwd += attn_flops(ctx)
        recompute += attn_flops(ctx) if cfg.train.recompute else 0.0
    fwd += sum(2.0 * g[1] * g[2] * g[3] for g in head_gemms(ctx))
    return 3 * fwd / ctx.tokens, (3 * fwd + recompute) / ctx.tokens


def membound_bytes(ctx: Ctx, layer_id: int) -> dict[str, float]:
    """Bytes moved per token (forward + backward + recompute) by one Block's memory-bound ops, counted
    from its shapes: each item reads and writes the tensors named."""
    m, a, e = ctx.cfg.model, ctx.cfg.model.mla, ctx.cfg.model.moe
    R, d = 2.0, m.dim
    L = FP8_ROW if ctx.cfg.fp8.enabled else R
    out = {}
    if ctx.cfg.fp8.enabled:   # quantise x and dy, transpose-quantise both for wgrad: 2(K + N)(R + L) per GEMM
        out["FP8 quantise / transpose"] = sum(2 * (g[3] + g[2]) * (R + L) * (g[1] * max(g[5], 1) / ctx.tokens)
                                             for g in layer_gemms(ctx, layer_id) if g[4])
    norms = [d, d, a.kv_lora_rank] + ([a.q_lora_rank] if a.q_lora_rank else [])
    out["RMSNorm fwd, recompute, bwd"] = sum(7 * w * R for w in norms)
    if layer_id < m.n_dense_layers:
        widths = m.inter_dim
    else:
        widths = e.n_activated_experts * e.moe_inter_dim + e.n_shared_experts * e.moe_inter_dim
        k = e.n_activated_experts
        out["router scores / top-k (12 passes over E FP32)"] = 12 * e.n_routed_experts * 4
        out["permute / unpermute"] = 2 * k * d * L + 2 * (2 * k + 1) * d * R
    out["SwiGLU fwd, recompute, bwd"] = 11 * widths * R
    out["RoPE"] = 4 * (a.n_heads + 1) * a.qk_rope_head_dim * R
    out["residual adds"] = 12 * d * R
    return out


def head_membound_bytes(ctx: Ctx) -> dict[str, float]:
    """Per token on the last stage: the vocabulary cross-entropy (FP32 logits written and read, BF16 grad
    written and read) once for the head and once per MTP depth."""
    m = ctx.cfg.model
    return {"cross-entropy over the vocabulary": (1 + m.mtp.depth) * m.vocab_size * (4 + 4 + 2 + 2)}


def _hbm_rate(ctx: Ctx) -> float:
    """Achievable HBM bytes/s: FlashMLA's measured 3000 GB/s of the H800's 3.35 TB/s, the same fraction here."""
    return src.FLASHMLA_GBS.value * 1e9 * ctx.gpu.hbm_tbs / GPUS["h800"].hbm_tbs


def _stage_times(ctx: Ctx, lo: int, hi: int, last: bool, on: set, n_params: float) -> dict[str, float]:
    """Seconds per micro-batch through one model stage: F, B (incl. W), W, the all-to-all, memory-bound."""
    cfg, m = ctx.cfg, ctx.cfg.model
    layers = list(range(lo, hi)) + ([m.n_layers + k for k in range(m.mtp.depth)] if last else [])
    F = B = W = comm = mem = 0.0
    straggle = 1 + ctx.maxvio if "a2a" in on and ctx.ep > 1 else 1.0   # the slowest EP rank sets the pace
    for i in layers:
        for g in layer_gemms(ctx, i):
            f, dg, wg = _gemm_time(ctx, g, on)
            s = straggle if g[5] else 1.0
            F, B, W = F + f * s, B + (dg + wg) * s, W + wg * s
            if g[0] in MLA_RECOMPUTED and cfg.train.recompute and "recompute" in on:
                B += f
        rate = (src.FLASHMLA_TFLOPS.value * ctx.gpu.bf16_dense_tflops / GPUS["h800"].bf16_dense_tflops
                if "attn" in on else ctx.gpu.bf16_dense_tflops) * 1e12
        F, B = F + attn_flops(ctx) / rate, B + 2 * attn_flops(ctx) / rate
        if cfg.train.recompute and "recompute" in on:
            B += attn_flops(ctx) / rate                 # the core's forward, re-run under MLA's checkpoint
        if "membound" in on:
            mem += sum(membound_bytes(ctx, i).values()) * ctx.tokens / _hbm_rate(ctx)
        if i >= m.n_dense_layers and ctx.ep > 1:
            comm += a2a_seconds(ctx, on)
    if last:
        for g in head_gemms(ctx):
            f, dg, wg = _gemm_time(ctx, g, on)
            F, B, W = F + f, B + dg + wg, W + wg
        if "membound" in on:
            mem += sum(head_membound_bytes(ctx).values()) * ctx.tokens / _hbm_rate(ctx)
    if "membound" in on:
        mem += 8 * n_params / _hbm_rate(ctx)          # FP32 main-grad read + write by each micro-batch's wgrad
    overlapped = ctx.ep > 1 and cfg.parallel.overlap and get_schedule(cfg.parallel.pp_schedule).overlaps_f_and_b
    if "sms" in on and overlapped:
        k = ctx.gpu.sms / (ctx.gpu.sms - src.COMM_SMS.value)
        F, B, W = F * k, B * k, W * k
    F, B = F + mem / 3, B + 2 * mem / 3
    exposed = max(0.0, comm - (F + B)) if overlapped and ctx.pp > 1 else comm
    return dict(F=F, B=B, W=W, comm=comm, exposed=exposed, mem=mem)


def a2a_seconds(ctx: Ctx, on: set) -> float:
    """One MoE layer's dispatch + combine, forward and backward, for a micro-batch on this GPU: per token
    the FP8 row (BF16 in backward) to each remote node it reaches (≤ topk_group nodes, uniform over the
    EP group's nodes) over IB; within one node to each remote GPU over NVLink."""
    e, d, M = ctx.cfg.model.moe, ctx.cfg.model.dim, ctx.tokens
    nodes = max(1, ctx.ep // GPUS_PER_NODE)
    if nodes > 1:
        reach = min(e.topk_group if e.n_group > 1 else e.n_activated_experts, nodes) * (nodes - 1) / nodes
        line = src.IB_GBS.value
    else:
        reach = e.n_activated_experts * (ctx.ep - 1) / ctx.ep
        line = ctx.gpu.nvlink_gbs / 2
    disp_fp8 = FP8_ROW if ctx.cfg.fp8.enabled and ctx.cfg.fp8.dispatch else 2.0
    dispatch_like = M * reach * d * (disp_fp8 + 2.0)     # forward dispatch + backward of the combine
    combine_like = M * reach * d * (2.0 + 2.0)           # forward combine + backward of the dispatch
    if "a2a" not in on:
        return (dispatch_like + combine_like) / (line * 1e9)
    bw_d, bw_c, _ = src.deepep_bandwidth(ctx.ep)
    return (1 + ctx.maxvio) * (dispatch_like / (bw_d * 1e9) + combine_like / (bw_c * 1e9))


def step(ctx: Ctx, on: set, rank_params: list[dict]) -> dict:
    """Seconds of one optimizer step and its parts, for the busiest rank (mean rank when 'imbalance' is off)."""
    cfg, m = ctx.cfg, ctx.cfg.model
    kind = cfg.parallel.pp_schedule if ctx.pp > 1 else "1f1b"
    sched = get_schedule(kind)
    n_stages, held = rank_stages(kind, ctx.pp)
    bounds = stage_bounds(m.n_layers, n_stages)
    per_stage_params = {s: 0.0 for s in range(n_stages)}
    for r, stages in enumerate(held):
        for s in stages:
            per_stage_params[s] = rank_params[r]["n_params"] / len(stages)
    times = [_stage_times(ctx, bounds[s], bounds[s + 1], s == n_stages - 1, on, per_stage_params[s]) for s in range(n_stages)]
    mbs = ctx.chunks // len(sched.chain_mbs(ctx.pp, ctx.chunks))   # micro-batches through each pipe stage
    work = [sum(mbs * (times[s]["F"] + times[s]["B"] + times[s]["exposed"]) for s in stages) for stages in held]
    busiest = max(range(len(held)), key=lambda r: work[r])
    compute = work[busiest] if "imbalance" in on else sum(work) / len(work)
    stage = {k: sum(times[s][k] for s in held[busiest]) / len(held[busiest]) for k in ("F", "B", "W")}
    if "imbalance" not in on:
        stage = {k: sum(t[k] for t in times) / n_stages for k in ("F", "B", "W")}
    F, B, W = stage["F"], stage["B"], stage["W"]
    bubble = 0.0 if ctx.pp == 1 else sched.bubble(ctx.pp, F, B, W)   # report Table 2, F&B = F + B (no overlap gain)
    p2p = 0.0
    if "p2p" in on and ctx.pp > 1:
        p2p = 2 * (n_stages - 1) * ctx.tokens * m.dim * 2.0 / (src.IB_GBS.value * 1e9)
    zero = 0.0
    if "zero" in on:
        rp = rank_params[busiest]
        edp = ctx.dp // ctx.ep if ctx.ep > 1 else ctx.dp
        # (parameters, group size, ranks the group spans): DP = consecutive ranks, expert-DP = stride ep
        for n, world, span in ((rp["n_dense"], ctx.dp, ctx.dp), (rp["n_expert"], edp, edp * ctx.ep)):
            if world > 1:   # ring: FP32 gradients reduce-scattered, BF16 parameters all-gathered
                bw = (src.IB_GBS.value if span > GPUS_PER_NODE else ctx.gpu.nvlink_gbs / 2) * 1e9
                zero += (4 + 2) * n * (world - 1) / world / bw
        moment = 2 if cfg.train.bf16_moments else 4
        zero += (rp["optimizer"] / (4 + 2 * moment) * (14 + 4 * moment) + 4 * rp["n_params"]) / _hbm_rate(ctx)
    total = compute + bubble + p2p + zero
    return dict(total=total, compute=compute, bubble=bubble, p2p=p2p, zero=zero, busiest=busiest,
                exposed=sum(mbs * times[s]["exposed"] for s in held[busiest]),
                comm=sum(mbs * times[s]["comm"] for s in held[busiest]), F=F, B=B, W=W)
