"""Budget planner: ``python -m dsv3.tools.plan CONFIG --gpus N --gpu h800 [--pp --ep --dp --maxvio --search]``.

Prints, for one layout, the memory of its busiest GPU against the GPU's capacity less a reserve, and two
step times: the **ideal** bound (every GEMM at the dense peak of its precision, the mean rank, the
all-to-all at line rate beyond what DualPipe hides, the pipeline bubble) and the **expected** one, the
ideal with each factor of ``dsv3.tools.plan_factors.FACTORS`` switched to its sourced value — printed one by
one with its contribution to the step. No calibration constant: the expected figure is what the factors
give. MFU = model FLOPs (no recompute) per second over the dense BF16 and FP8 peaks; HFU adds the
recomputed GEMMs. ``--search`` lists the layouts that fit, cheapest first. Memory: dsv3/tools/plan_memory.py.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from dsv3.tools import plan_sources as src
from dsv3.data.batch import micro_batch_size
from dsv3.config import Config, ConfigError, load_config
from dsv3.errors import UserError
from dsv3.tools.hardware import GPU, GPUS, get_gpu
from dsv3.tools.plan_factors import FACTORS, Ctx, model_flops_per_token, step
from dsv3.tools.plan_memory import ActDtypes, rank_activation_bytes, rank_state_bytes  # noqa: F401 (re-exported)
from parallel.schedules import get_schedule

GIB = 1024 ** 3
# The reserve kept free on every GPU (GiB). Assumed, not measured here (this session had no GPU):
# change them with --reserve-gib when a run's peak memory is known.
RESERVE = {"CUDA context + cuBLAS workspace": 1.0,
           "NCCL communicators and buffers": 1.0,
           "DeepEP all-to-all buffers": 2.0}
FRAGMENTATION = 0.05      # of the GPU's memory, PyTorch caching-allocator slack (assumed)
MAXVIO_SWEEP = (0.0, src.MAXVIO_DEFAULT.value, 0.1, 0.2, 0.5, 1.0)


def remedies(cfg: Config) -> str:
    """What to change when a layout does not fit, leaving out what the config already does."""
    out = ["more pipeline stages (--pp)", "more expert parallelism (--ep)"]
    if not cfg.train.recompute:
        out.append("train.recompute=true")
    if cfg.train.micro_batch_size == "auto" or cfg.train.micro_batch_size > 1:
        out.append("a smaller train.micro_batch_size")
    elif cfg.data.seq_len > 1024:
        out.append("shorter micro-batches (train.micro_batch_size is 1: data.seq_len)")
    return ", ".join(out) + ", or a GPU with more memory (--gpu)"


@dataclass
class Plan:
    layout: tuple[int, int, int]
    gpu: GPU
    state: dict                 # busiest-memory rank: params / grads / optimizer bytes, n_params
    activations: float
    reserve: float
    memory_rank: int
    ideal: dict
    expected: dict
    factors: list = field(default_factory=list)   # (label, step seconds after it, Δ seconds)
    model_flops: float = 0.0    # per token
    hw_flops: float = 0.0
    tokens_per_step: int = 0
    micro_batch: int = 1

    @property
    def total_bytes(self) -> float:
        return self.state["params"] + self.state["grads"] + self.state["optimizer"] + self.activations

    @property
    def fits(self) -> bool:
        return self.total_bytes + self.reserve <= self.gpu.hbm_gib * GIB

    def rates(self, which: dict) -> dict:
        gpus = self.layout[0] * self.layout[1]
        tok = self.tokens_per_step / which["total"] / gpus
        return dict(tok_s_gpu=tok, tflops=tok * self.model_flops / 1e12,
                    mfu_bf16=tok * self.model_flops / (self.gpu.bf16_dense_tflops * 1e12),
                    mfu_fp8=tok * self.model_flops / (self.gpu.fp8_dense_tflops * 1e12),
                    hfu_bf16=tok * self.hw_flops / (self.gpu.bf16_dense_tflops * 1e12),
                    gpu_hours_per_t=1e12 / tok / 3600)


def _hours(h: float) -> str:
    return f"{h / 1e3:,.0f}K" if h >= 1e4 else f"{h:,.0f}"


def check_layout(cfg: Config, gpus: int, pp: int, ep: int, dp: int, micro_batch: int, global_batch: int) -> None:
    """One ConfigError naming what to change when the layout cannot run (the trainer's own rules)."""
    m, kind = cfg.model, cfg.parallel.pp_schedule
    sched = get_schedule(kind)
    if pp * dp != gpus:
        raise ConfigError(f"--gpus {gpus} must equal pp × dp = {pp} × {dp}")
    if dp % ep or m.moe.n_routed_experts % ep:
        raise ConfigError(f"ep={ep} must divide dp={dp} and model.moe.n_routed_experts={m.moe.n_routed_experts}")
    stages = sched.num_model_stages(pp) if pp > 1 else pp
    if stages > m.n_layers:
        raise ConfigError(f"pp={pp} gives {stages} model stages for {m.n_layers} layers: lower --pp")
    chunks = global_batch // dp // micro_batch
    if global_batch % (dp * micro_batch) or chunks < 1:
        raise ConfigError(f"global batch {global_batch} does not split into dp={dp} × micro-batches of {micro_batch}")
    need = sched.fewest_chunks(pp)
    if pp > 1 and (not sched.accepts_chunks(pp, chunks) or (sched.even_ranks and pp % 2)):
        rules = ("an even pp and " if sched.even_ranks else "") + ("an even number of " if sched.even_chunks else "")
        raise ConfigError(f"{kind} on pp={pp} needs {rules}≥ {need} micro-batches per step, got {chunks}: "
                          f"change --pp or the batch")


def plan(cfg: Config, gpus: int, gpu: str, pp: int, ep: int, dp: int, global_batch: int | None = None,
         micro_batch: int | None = None, maxvio: float = src.MAXVIO_DEFAULT.value,
         reserve_gib: float | None = None) -> Plan:
    g = get_gpu(gpu)
    gb = global_batch or cfg.train.global_batch
    mb = micro_batch or cfg.train.micro_batch_size
    if mb == "auto":   # the trainer's rule for this layout (dsv3/data/batch.py), once the layout itself is valid
        check_layout(cfg, gpus, pp, ep, dp, 1, gb)
        try:
            mb = micro_batch_size(dataclasses.replace(cfg.train, global_batch=gb), dp, pp, cfg.parallel.pp_schedule)
        except UserError as e:
            raise ConfigError(str(e)) from None
    check_layout(cfg, gpus, pp, ep, dp, mb, gb)
    kind = cfg.parallel.pp_schedule if pp > 1 else "1f1b"
    states = rank_state_bytes(cfg, pp, dp, ep, kind)
    acts = rank_activation_bytes(cfg, pp, kind, mb, ActDtypes.for_training(cfg), num_chunks=gb // dp // mb)
    r = max(range(pp), key=lambda i: states[i]["params"] + states[i]["grads"] + states[i]["optimizer"] + acts[i])
    reserve = (sum(RESERVE.values()) + FRAGMENTATION * g.hbm_gib if reserve_gib is None else reserve_gib) * GIB
    ctx = Ctx(cfg, g, pp, dp, ep, mb, gb, maxvio)
    on: set = set()
    ideal = step(ctx, on, states)
    rows, prev = [], ideal["total"]
    for key, label in FACTORS:
        on.add(key)
        cur = step(ctx, on, states)
        rows.append((key, label, cur["total"], cur["total"] - prev))
        prev = cur["total"]
    model, hw = model_flops_per_token(cfg, ctx)
    return Plan((pp, dp, ep), g, states[r], acts[r], reserve, r, ideal, cur, rows, model, hw,
                gb * cfg.data.seq_len, mb)


def is_report_config(cfg: Config) -> bool:
    """The DeepSeek-V3 671B model (config_671B.json shapes): the only one the report's figures describe."""
    m = cfg.model
    return (m.dim, m.n_layers, m.vocab_size, m.moe.n_routed_experts, m.moe.n_activated_experts, m.mtp.depth) == \
        (7168, 61, 129280, 256, 8, 1)


FACTOR_SOURCES = {
    "gemm": src.DEEPGEMM_SOURCE, "attn": src.FLASHMLA_TFLOPS.source,
    "recompute": "report §3.2.3; this trainer's MLA.recompute (dsv3/model/mla.py)", "sms": src.COMM_SMS.source,
    "membound": src.FLASHMLA_GBS.source + "; bytes counted from the shapes (dsv3/plan_factors.membound_bytes)",
    "imbalance": "parallel/stage_cut.stage_bounds, the trainer's cut", "a2a": src.DEEPEP_SOURCE + "; " + src.MAXVIO_DEFAULT.source,
    "p2p": src.IB_GBS.source, "zero": src.IB_GBS.source + "; AdamW bytes per shard element (parallel/zero.py)",
}


def report(cfg: Config, p: Plan, maxvio_sweep: list) -> str:
    pp, dp, ep = p.layout
    s, G = p.state, GIB
    lines = [f"layout: {pp * dp} × {p.gpu.name}  PP{pp} × DP{dp}, EP{ep} (expert-DP {dp // ep}), "
             f"schedule {cfg.parallel.pp_schedule if pp > 1 else 'none'}, ZeRO-1, micro-batch "
             f"{p.micro_batch} × {cfg.data.seq_len} tokens, global batch {p.tokens_per_step // cfg.data.seq_len}",
             f"busiest memory: pipeline rank {p.memory_rank} (model stages {s['stages']}), {s['n_params'] / 1e9:.2f}B parameters",
             f"memory per GPU: params {s['params'] / G:.1f} GiB | grads {s['grads'] / G:.1f} GiB | optimizer "
             f"{s['optimizer'] / G:.1f} GiB | activations {p.activations / G:.1f} GiB | total {p.total_bytes / G:.1f} GiB "
             f"+ reserve {p.reserve / G:.1f} GiB {'fits in' if p.fits else 'EXCEEDS'} {p.gpu.hbm_gib:.1f} GiB"]
    lines.append(f"step (busiest pipeline rank {p.expected['busiest']}): ideal {p.ideal['total']:.2f} s, "
                 f"expected {p.expected['total']:.2f} s")
    lines.append("factors (applied in order; Δ = change of the step time):")
    for i, (key, label, total, delta) in enumerate(p.factors, 1):
        lines.append(f"  {delta:+8.2f} s → {total:7.2f} s  {label} [{i}]")
    ex = p.expected
    lines.append(f"expected parts: compute {ex['compute']:.2f} s (of which exposed all-to-all {ex['exposed']:.2f} s of "
                 f"{ex['comm']:.2f} s), bubble {ex['bubble']:.2f} s, P2P {ex['p2p']:.2f} s, ZeRO + optimizer {ex['zero']:.2f} s")
    for name, which in (("ideal", p.ideal), ("expected", p.expected)):
        r = p.rates(which)
        lines.append(f"{name:8s}: {r['tok_s_gpu']:,.0f} tokens/s/GPU | {r['tflops']:.0f} model TFLOPS/GPU | "
                     f"MFU {100 * r['mfu_bf16']:.1f}% of BF16 dense peak ({p.gpu.bf16_dense_tflops:g} TFLOPS), "
                     f"{100 * r['mfu_fp8']:.1f}% of FP8 dense peak ({p.gpu.fp8_dense_tflops:g}) | HFU "
                     f"{100 * r['hfu_bf16']:.1f}% of BF16 | {_hours(r['gpu_hours_per_t'])} GPU-hours per trillion tokens")
    lines.append(f"model FLOPs per token {p.model_flops / 1e9:.1f} G (forward + backward, attention and MTP included); "
                 f"with recompute {p.hw_flops / 1e9:.1f} G")
    if maxvio_sweep:
        lines.append("expected GPU-hours per trillion tokens by MaxVio (EP straggler): " + ", ".join(
            f"{v:g} → {_hours(h)}" for v, h in maxvio_sweep))
    if is_report_config(cfg):
        e = p.rates(p.expected)["gpu_hours_per_t"]
        lines.append(f"DeepSeek-V3 report (H800): {src.REPORT_GPU_HOURS_PER_T.value / 1e3:.0f}K GPU-hours per trillion "
                     f"tokens, {src.REPORT_PRETRAIN_GPU_HOURS.value / 1e6:.3f}M for 14.8T; this plan: {e / 1e3:,.0f}K, "
                     f"{14.8 * e / 1e6:.3f}M ({e / src.REPORT_GPU_HOURS_PER_T.value:.2f}× the report)")
    lines.append(f"reserve: {', '.join(f'{k} {v:g} GiB' for k, v in RESERVE.items())}, fragmentation "
                 f"{100 * FRAGMENTATION:g}% of memory (assumed; --reserve-gib sets the total)")
    lines.append(f"peaks: {p.gpu.source}")
    lines.append("sources: " + "\n         ".join(f"[{i}] {FACTOR_SOURCES[k]}" for i, (k, *_) in enumerate(p.factors, 1)))
    return "\n".join(lines)


def search(cfg: Config, gpus: int, gpu: str, maxvio: float, reserve_gib: float | None,
           global_batch: int | None = None, micro_batch: int | None = None) -> list[Plan]:
    """Every (pp, ep) layout of ``gpus`` the trainer can run that fits, cheapest expected GPU-hours first."""
    out, runnable, why = [], 0, None
    for pp in [d for d in range(1, gpus + 1) if gpus % d == 0]:
        dp = gpus // pp
        for ep in [e for e in range(1, dp + 1) if dp % e == 0]:
            try:
                p = plan(cfg, gpus, gpu, pp, ep, dp, global_batch, micro_batch, maxvio, reserve_gib)
            except ConfigError as e:
                why = why or e
                continue
            runnable += 1
            if p.fits:
                out.append(p)
    if not runnable:
        raise ConfigError(f"no layout of {gpus} GPUs can run this config (e.g. {why}): change --gpus or the batch")
    if not out:
        raise ConfigError(f"none of the {runnable} layouts of {gpus} × {gpu} fits in memory: try {remedies(cfg)}")
    return sorted(out, key=lambda p: p.rates(p.expected)["gpu_hours_per_t"])


def _positive(flag: str, value):
    if value is not None and value < 1:
        raise ConfigError(f"--{flag} {value}: expected a positive integer")


def main(argv=None) -> int:
    from dsv3.checkpoint.hf import OneLineParser
    ap = OneLineParser(prog="python -m dsv3.tools.plan", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a dsv3 YAML config (model, batch, schedule, precision)")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in all (= pp × dp)")
    ap.add_argument("--gpu", default="h800", help=f"GPU model: {', '.join(sorted(GPUS))} (h100 = h100_sxm)")
    ap.add_argument("--pp", type=int, help="pipeline-parallel ranks (default: the config's parallel.pp)")
    ap.add_argument("--ep", type=int, help="expert-parallel size, a divisor of dp (default: the config's parallel.ep)")
    ap.add_argument("--dp", type=int, help="data-parallel replicas (default: gpus / pp)")
    ap.add_argument("--batch-sequences", type=int, help="global batch in sequences (default: train.global_batch)")
    ap.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: train.micro_batch_size)")
    ap.add_argument("--maxvio", type=float, default=src.MAXVIO_DEFAULT.value,
                    help=f"expert load MaxVio for the EP straggler factor (default {src.MAXVIO_DEFAULT.value:g}: "
                         "Wang et al. 2024 Table 2, loss-free balancing)")
    ap.add_argument("--reserve-gib", type=float, help="memory kept free per GPU, GiB (default: the listed reserve)")
    ap.add_argument("--search", action="store_true", help="list every layout of --gpus that fits, cheapest first")
    try:
        args = ap.parse_args(argv)
        for flag in ("gpus", "pp", "ep", "dp", "batch_sequences", "micro_batch"):
            _positive(flag.replace("_", "-"), getattr(args, flag))
        if args.maxvio < 0:
            raise ConfigError(f"--maxvio {args.maxvio}: expected ≥ 0")
        try:
            get_gpu(args.gpu)
        except KeyError as e:
            raise ConfigError(f"--gpu: {e.args[0]}") from None
        cfg = load_config(args.config)
        if args.search:
            found = search(cfg, args.gpus, args.gpu, args.maxvio, args.reserve_gib, args.batch_sequences,
                           args.micro_batch)
            print(f"layouts of {args.gpus} × {found[0].gpu.name} that fit, cheapest expected first:")
            for p in found:
                r = p.rates(p.expected)
                print(f"  PP{p.layout[0]:<3d} DP{p.layout[1]:<5d} EP{p.layout[2]:<4d} memory {p.total_bytes / GIB:6.1f} GiB  "
                      f"expected {_hours(r['gpu_hours_per_t'])} GPU-hours/T, MFU {100 * r['mfu_bf16']:.1f}% BF16")
            return 0
        pp = args.pp if args.pp is not None else cfg.parallel.pp
        ep = args.ep if args.ep is not None else cfg.parallel.ep
        if args.dp is None and args.gpus % pp:
            raise ConfigError(f"--gpus {args.gpus} is not a multiple of pp={pp}: change --gpus or --pp")
        dp = args.dp if args.dp is not None else args.gpus // pp
        p = plan(cfg, args.gpus, args.gpu, pp, ep, dp, args.batch_sequences, args.micro_batch, args.maxvio,
                 args.reserve_gib)
        sweep = []
        for v in MAXVIO_SWEEP:
            q = plan(cfg, args.gpus, args.gpu, pp, ep, dp, args.batch_sequences, args.micro_batch, v, args.reserve_gib)
            sweep.append((v, q.rates(q.expected)["gpu_hours_per_t"]))
        print(report(cfg, p, sweep))
        if not p.fits:
            raise ConfigError(f"memory: pipeline rank {p.memory_rank} needs {p.total_bytes / GIB:.1f} GiB + reserve "
                              f"{p.reserve / GIB:.1f} GiB > {p.gpu.hbm_gib:.1f} GiB on {p.gpu.name}; try {remedies(cfg)}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
