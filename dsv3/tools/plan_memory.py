"""The planner's memory side: parameters per module from the config's shapes, each pipeline rank's
parameter / gradient / optimizer bytes as the trainer allocates them, and the activations autograd
keeps per token per layer (report §3.2.3 recomputation, §3.3 FP8 caching).

Trainer assumptions (issue 17 C): BF16 compute weights, FP32 gradients (main-grad), ZeRO-1 FP32 master
+ two AdamW moments (BF16 with ``train.bf16_moments``), each parameter flattened and padded to W·⌈n/W⌉
(parallel/zero.py) over DP for dense and over DP/EP for expert parameters; routed experts sharded over
EP; layers cut by ``parallel.stage_cut.stage_bounds``, the embedding on the first stage, the final norm,
head and MTP (with the embedding it shares) on the last; a DualPipe rank holds model stages r and
PP−1−r, a DualPipeV rank stages r and 2·PP−1−r, and an embedding both of its stages use is held once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dsv3.config import Config, ModelConfig
from parallel.schedules import get_schedule
from parallel.stage_cut import stage_bounds

FP8_ROW = 1 + 4 / 128       # one E4M3 byte per value + one FP32 scale per 128 values


def block_params(m: ModelConfig, layer_id: int) -> list[tuple[str, int, bool]]:
    """(name, numel, is_routed_expert) of one Block (dsv3/model/block.py, mla.py, moe.py, layers.py)."""
    a, e, d = m.mla, m.moe, m.dim
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    out = [("attn_norm", d, False)]
    if a.q_lora_rank is None:
        out.append(("attn.wq", d * a.n_heads * qk, False))
    else:
        out += [("attn.wq_a", d * a.q_lora_rank, False), ("attn.q_norm", a.q_lora_rank, False),
                ("attn.wq_b", a.q_lora_rank * a.n_heads * qk, False)]
    out += [("attn.wkv_a", d * (a.kv_lora_rank + a.qk_rope_head_dim), False), ("attn.kv_norm", a.kv_lora_rank, False),
            ("attn.wkv_b", a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), False),
            ("attn.wo", a.n_heads * a.v_head_dim * d, False), ("ffn_norm", d, False)]
    if layer_id < m.n_dense_layers:
        out += [(f"ffn.{w}", d * m.inter_dim, False) for w in ("w1", "w2", "w3")]
    else:
        out.append(("ffn.gate", e.n_routed_experts * d, False))
        out += [(f"ffn.experts.{w}", e.n_routed_experts * e.moe_inter_dim * d, True) for w in ("w1", "w2", "w3")]
        if e.n_shared_experts:
            out += [(f"ffn.shared.{w}", d * e.n_shared_experts * e.moe_inter_dim, False) for w in ("w1", "w2", "w3")]
    return out


def stage_params(m: ModelConfig, lo: int, hi: int, first: bool, last: bool) -> list[tuple[str, int, bool]]:
    """Parameters of the model stage holding layers [lo, hi) (parallel/dsv3_stages.DSV3Stage)."""
    out = []
    if first or (last and m.mtp.depth > 0):
        out.append(("embed", m.vocab_size * m.dim, False))
    for i in range(lo, hi):
        out += [(f"layers.{i}.{n}", k, x) for n, k, x in block_params(m, i)]
    if last:
        out += [("norm", m.dim, False), ("head", m.vocab_size * m.dim, False)]
        for k in range(m.mtp.depth):
            out += [(f"mtp.{k}.enorm", m.dim, False), (f"mtp.{k}.hnorm", m.dim, False),
                    (f"mtp.{k}.eh_proj", 2 * m.dim * m.dim, False)]
            out += [(f"mtp.{k}.block.{n}", c, x) for n, c, x in block_params(m, m.n_layers + k)]
            out.append((f"mtp.{k}.norm", m.dim, False))
    return out


def rank_stages(schedule: str, pp: int) -> tuple[int, list[list[int]]]:
    """(number of model stages, the model stages each pipeline rank holds) — the schedule's layout
    (parallel/schedules.py)."""
    if pp == 1:
        return 1, [[0]]
    lay = get_schedule(schedule).layout(pp)
    return lay.num_model_stages, [lay.model_stages_of(r) for r in range(pp)]


def in_flight(schedule: str, pp: int, num_stages: int, stage: int, num_chunks: int) -> int:
    """Micro-batches whose activations model stage ``stage`` holds at the peak: the schedule's
    ``Schedule.in_flight`` (1F1B, ZB1P, DualPipe(V): N − s, so a DualPipe rank holds PP + 1; report Table 2)."""
    if pp == 1:
        return 1
    return get_schedule(schedule).in_flight(num_stages, stage, num_chunks)


def rank_state_bytes(cfg: Config, pp: int, dp: int, ep: int, schedule: str) -> list[dict]:
    """Per pipeline rank 0…pp−1: {"params", "grads", "optimizer"} bytes on one GPU of that rank, plus
    "n_params" / "n_dense" / "n_expert" (this GPU's parameter counts, experts sharded) and "stages"."""
    m = cfg.model
    if m.moe.n_routed_experts % ep:
        raise ValueError(f"ep={ep} must divide model.moe.n_routed_experts={m.moe.n_routed_experts}")
    n_stages, held = rank_stages(schedule, pp)
    bounds = stage_bounds(m.n_layers, n_stages)
    moment = 2 if cfg.train.bf16_moments else 4
    dense_world, expert_world = dp, (dp // ep if ep > 1 else dp)
    out = []
    for stages in held:
        params: dict[str, tuple[int, bool]] = {}
        for s in stages:
            for name, n, expert in stage_params(m, bounds[s], bounds[s + 1], s == 0, s == n_stages - 1):
                params[name] = (n // ep if expert else n, expert)      # a shared tensor counts once
        n_params = sum(n for n, _ in params.values())
        n_expert = sum(n for n, x in params.values() if x)
        shard = sum(math.ceil(n / (expert_world if x else dense_world)) for n, x in params.values())
        out.append(dict(params=2 * n_params, grads=4 * n_params, optimizer=(4 + 2 * moment) * shard,
                        n_params=n_params, n_dense=n_params - n_expert, n_expert=n_expert, stages=stages))
    return out


@dataclass(frozen=True)
class ActDtypes:
    """Bytes per saved value: residual stream, the autocast dtype, a Linear's cached input, the attention
    core; the FP8 storage options (report §3.3.3); the CPU code paths (separate gate/up in FP32, V padded)."""
    resid: float
    cast: float
    linear_in: float
    attn: float
    fp8: bool
    wo_e5m6: bool             # wo's input kept in E5M6 (stored as 16 bits) + one FP32 scale per 128
    swiglu_fp8: bool          # experts and MLPs keep FP8 gate/up and recompute SwiGLU
    fp8_per_linear: bool      # fp8.backend=te: each FP8 Linear quantises (and keeps) its own copy of a shared input
    packed_swiglu: bool
    pad_v: bool

    @staticmethod
    def for_training(cfg: Config, device: str = "cuda") -> "ActDtypes":
        """GPU: BF16 weights and activations (issue 17 C/D). CPU: FP32 weights, autocast to train.dtype."""
        cast = 4.0 if cfg.train.dtype == "fp32" else 2.0
        resid = 4.0 if device == "cpu" else cast
        f8 = cfg.fp8
        return ActDtypes(resid, cast, FP8_ROW if f8.enabled else cast, 4.0 if device == "cpu" else cast, f8.enabled,
                         f8.enabled and f8.cache_wo_e5m6, f8.enabled and f8.cache_swiglu_fp8,
                         f8.enabled and f8.backend == "te",
                         not (device == "cpu" and cast == 4.0), device == "cpu")


def _mlp_swiglu_bytes(inter: int, dt: ActDtypes) -> float:
    """An MLP's SwiGLU and w2 per token: gate and up in E4M3 with one FP32 scale per 1×128 tile each
    (fp8.cache_swiglu_fp8: MLP.swiglu_down, the output recomputed), else gate, up (the recompute's inputs)
    and w2's input."""
    if dt.swiglu_fp8:
        return 2 * (inter + 4 * math.ceil(inter / 128))
    return inter * (2 * dt.resid + dt.linear_in)


def layer_activation_bytes(m: ModelConfig, layer_id: int, dt: ActDtypes) -> float:
    """Bytes autograd keeps per token for one Block with recomputation on (norm outputs, MLA's norms,
    up-projections, RoPE and attention core, and SwiGLU outputs recomputed; their inputs kept). Each
    term is one saved tensor."""
    a, e, d = m.mla, m.moe, m.dim
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    R, C, L, A = dt.resid, dt.cast, dt.linear_in, dt.attn
    shared_in = 2 if dt.fp8_per_linear else 1               # FP8 Linears sharing x keep one copy (shared_impl)
    b = d * R                                               # block input (attn_norm's recompute input)
    # MLA (dsv3/model/mla.py, recompute on): one checkpoint from the down-projections' outputs to the core's
    # output keeps c_Q (or q without q compression) and wkv_a's output [c_KV | k_rope], both un-normed
    b += (shared_in if a.q_lora_rank is not None else 1) * d * L    # normed x: wq_a / wq and wkv_a inputs
    b += (a.n_heads * qk if a.q_lora_rank is None else a.q_lora_rank) * R      # GEMM outputs: the residual
    b += (a.kv_lora_rank + a.qk_rope_head_dim) * R                              # dtype (FP32 on CPU, BF16 GPU)
    b += a.n_heads * a.v_head_dim * (2 + 4 / 128 if dt.wo_e5m6 else L)   # attention output: wo input
    # the RoPE cos / sin that RoPE and the checkpoint keep are views of the model's one table (a buffer): none
    b += d * R                                              # h: ffn_norm's recompute input
    # no FP8 weight copies: FP8 Linears and the routed experts' GEMMs keep the parameter itself and
    # re-quantise it in the backward (triton_kernels/fp8_linear.py, fp8_grouped_mm.py, fp8_swiglu.py)
    if layer_id < m.n_dense_layers:                         # normed h; the SwiGLU's input and w2's
        return b + shared_in * d * L + _mlp_swiglu_bytes(m.inter_dim, dt)
    k, E, I = e.n_activated_experts, e.n_routed_experts, e.moe_inter_dim
    # the gate's input (the normed h): recomputed from h in its backward (Block.ffn_source), not kept
    b += E * 4 + k * 8 + 4 + k * 4                          # sigmoid scores, chosen experts, weight sum, weights
    # the selection (bias, group limit, top-k sorts) runs without autograd: it keeps nothing (Gate._select)
    b += 2 * k * 8 + k * 4                                  # sorted order, source token, gate weight of each row
    if dt.fp8:                                              # one token-tiled FP8 x for the GEMM over [w1; w3]
        b += k * d * L
        if dt.swiglu_fp8:                                   # gate and up in E4M3 + one FP32 scale per 1×128
            b += 2 * k * (I + 4 * math.ceil(I / 128))
        else:                                               # [gate | up], up·w (checkpoint inputs), w, w2's FP8 input
            b += k * (3 * I * C + C + I * L)
    else:                                                   # x once; [gate|up] (+ unweighted up on CPU FP32); w2 input
        b += k * d * C + k * I * ((2 if dt.packed_swiglu else 3) * C + L)
    # the combine (experts.sum_rows) keeps only its row index, and the gate weight multiplies h before the
    # down-projection: no expert output row is kept
    if e.n_shared_experts:
        Is = e.n_shared_experts * I
        b += shared_in * d * L if dt.fp8 else d * C        # FP8 copies of the normed h, or it (or its cast)
        b += _mlp_swiglu_bytes(Is, dt)
    return b + 4                                            # the balance loss's score sums


def head_activation_bytes(m: ModelConfig, dt: ActDtypes) -> float:
    """Per token on the last stage: final norm input and output (head input), the fused head +
    cross-entropy's per-row statistics; per MTP module its two norms' inputs, eh_proj's input, one Block
    and its own head. Modelled from dsv3/model/transformer.py / mtp.py, not measured."""
    d, R, L = m.dim, dt.resid, dt.linear_in
    head = d * R + 4 + d * L + 8
    mtp = 2 * d * R + 8 + 2 * d * L + head
    return head + m.mtp.depth * mtp


def stage_activation_bytes(m: ModelConfig, lo: int, hi: int, last: bool, dt: ActDtypes) -> float:
    """Per token of one micro-batch through model stage [lo, hi) (+ head and MTP blocks on the last)."""
    total = sum(layer_activation_bytes(m, i, dt) for i in range(lo, hi))
    if last:
        total += head_activation_bytes(m, dt) + sum(layer_activation_bytes(m, m.n_layers + k, dt)
                                                    for k in range(m.mtp.depth))
    return total


def rank_activation_bytes(cfg: Config, pp: int, schedule: str, micro_batch: int, dt: ActDtypes,
                          num_chunks: int | None = None) -> list[float]:
    """Peak activation bytes per pipeline rank: Σ over its stages of in-flight micro-batches × tokens × per-token
    bytes; ``num_chunks`` (micro-batches per step) defaults to the schedule's fewest."""
    m = cfg.model
    if num_chunks is None:
        num_chunks = get_schedule(schedule).fewest_chunks(pp)
    n_stages, held = rank_stages(schedule, pp)
    bounds = stage_bounds(m.n_layers, n_stages)
    tokens = micro_batch * cfg.data.seq_len
    return [sum(in_flight(schedule, pp, n_stages, s, num_chunks) * tokens
                * stage_activation_bytes(m, bounds[s], bounds[s + 1], s == n_stages - 1, dt)
                for s in stages) for stages in held]
