"""The config reference, generated from the dataclasses of dsv3/config.py: every key's type, default,
one line of meaning and, where the DeepSeek-V3 report names it, its symbol (report §2–4).

    python -m dsv3.tools.show_config --help                        # usage and the whole reference
    python -m dsv3.tools.show_config --describe model.moe.n_activated_experts
    python -m dsv3.tools.show_config --describe model.moe          # every key under a section

``DOC`` holds the one-line meanings keyed by dotted path (``train.lr_segments[].kind`` for the
fields of a list's items); ``SYMBOL`` the report's symbols. docs/config.md is ``markdown()`` written
out: tests/test_config_doc.py fails when it is stale or when a key of the tree has no line here.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import MISSING
from typing import Iterator, Literal, NamedTuple, Optional

from dsv3.config import Config, ConfigError

DOC: dict[str, str] = {
    # model
    "model.vocab_size": "token vocabulary size (the tokenizer is trained to it)",
    "model.dim": "hidden size of the residual stream",
    "model.n_layers": "Transformer blocks (dense and MoE together, MTP modules not counted)",
    "model.n_dense_layers": "first blocks with a dense FFN instead of MoE (HF: first_k_dense_replace)",
    "model.inter_dim": "intermediate width of the dense FFN",
    "model.norm_eps": "RMSNorm epsilon",
    "model.init_std": "standard deviation of the normal weight initialisation (report §4.2: 0.006)",
    "model.max_seq_len": "longest sequence the model accepts (RoPE tables are built to it)",
    # model.mla
    "model.mla.n_heads": "attention heads",
    "model.mla.q_lora_rank": "query compression dimension; null = plain query projection (V2-Lite)",
    "model.mla.kv_lora_rank": "key-value compression dimension (the cached latent)",
    "model.mla.qk_nope_head_dim": "per-head query/key dimension without RoPE",
    "model.mla.qk_rope_head_dim": "per-head dimension of the decoupled RoPE query/key (even)",
    "model.mla.v_head_dim": "per-head value dimension",
    "model.mla.rope_theta": "RoPE base frequency",
    "model.mla.rope_scaling": "YaRN context extension (report §4.3); null = plain RoPE",
    "model.mla.rope_scaling.type": "scaling method (only yarn)",
    "model.mla.rope_scaling.factor": "context extension factor",
    "model.mla.rope_scaling.original_max_position_embeddings": "context length the model was pretrained at",
    "model.mla.rope_scaling.beta_fast": "YaRN ramp: dimensions turning more than this many times over the original context keep their frequency",
    "model.mla.rope_scaling.beta_slow": "YaRN ramp: dimensions turning fewer times than this are fully interpolated",
    "model.mla.rope_scaling.mscale": "attention temperature coefficient (√t = 0.1 · mscale · ln s + 1)",
    "model.mla.rope_scaling.mscale_all_dim": "the same coefficient applied to all dimensions (softmax scale)",
    # model.moe
    "model.moe.n_routed_experts": "routed experts per MoE layer",
    "model.moe.n_shared_experts": "shared experts every token goes through",
    "model.moe.moe_inter_dim": "intermediate width of each expert",
    "model.moe.n_activated_experts": "routed experts per token (top-k)",
    "model.moe.n_group": "expert groups (one group per node in the report's layout)",
    "model.moe.topk_group": "groups a token may be routed to (node-limited routing); = n_group turns the limit off",
    "model.moe.routed_scaling_factor": "scale on the routed experts' gate weights",
    "model.moe.scoring_func": "affinity function, a name in dsv3/model/router.py's table: sigmoid (V3) or "
                              "softmax (V2) built in",
    "model.moe.topk_method": "expert selection, a name in dsv3/model/router.py's table: noaux_tc (V3, biased "
                             "scores, groups by top-2 sum), group_limited_greedy (V2), greedy built in",
    "model.moe.norm_topk_prob": "normalise the selected gate weights to sum to 1",
    "model.moe.bias_update": "aux-loss-free bias update rule, a name in dsv3/model/router.py's table: sign "
                             "(report), proportional or none built in",
    "model.moe.bias_update_speed": "bias update speed per step (report: 0.001, then 0)",
    "model.moe.bias_update_stop_tokens": "γ becomes 0 after this many training tokens (report: 14.3T); null = never",
    "model.moe.aux_loss_alpha": "weight of the complementary balance loss (report: 0.0001); 0 = off",
    "model.moe.aux_loss_type": "balance loss over each sequence (report) or the whole batch",
    "model.moe.grouped_mm_impl": "expert GEMM: auto (torch._grouped_mm where it works, else segments), loop (reference), segments, grouped_mm",
    # model.mtp
    "model.mtp.depth": "Multi-Token Prediction modules (extra tokens predicted); 0 = no MTP",
    "model.mtp.lambda_start": "MTP loss weight at the start (report: 0.3)",
    "model.mtp.lambda_end": "MTP loss weight after lambda_switch_tokens (report: 0.1)",
    "model.mtp.lambda_switch_tokens": "tokens after which the weight becomes lambda_end (report: 10T); null = never",
    # fp8
    "fp8.enabled": "FP8 (E4M3) GEMMs for the Linears and experts, the rest in BF16/FP32 (report §3.3)",
    "fp8.backend": "FP8 kernels: auto (Triton on CUDA, else torch), triton, torch, or te (Transformer Engine Float8BlockScaling Linears, Hopper)",
    "fp8.block": "quantisation tile: 1×block activation scales, block×block weight scales (only 128)",
    "fp8.dispatch": "send MoE dispatch activations in FP8 with power-of-2 scales (needs fp8.enabled)",
    "fp8.grad_dispatch": "expert-parallel backward: send the gradient before the MoE down-projection (combine's backward) in FP8 with power-of-2 scales; combine stays BF16 (report §3.3.3, needs fp8.enabled)",
    "fp8.cache_wo_e5m6": "cache the attention output projection's input in E5M6 with power-of-2 scales (report §3.3.3)",
    "fp8.cache_swiglu_fp8": "cache the SwiGLU input in FP8 and recompute its output in backward — routed and shared experts and the dense FFN (report §3.3.3)",
    "fp8.high_precision": "GEMM passes left unquantised, as CLASS.PASS (attention, dense, experts × fprop, dgrad, wgrad), e.g. [experts.wgrad]: a diagnostic that traces an FP8 loss gap to a GEMM class (benchmarks/fp8_loss_gap.py --classes); TE's override_linear_precision per class",
    # parallel
    "parallel.pp": "pipeline-parallel ranks",
    "parallel.pp_schedule": "pipeline schedule, a name in parallel/schedules.py's SCHEDULES: 1f1b, zb1p (zero "
                            "bubble), dualpipe (even pp) or dualpipev built in",
    "parallel.ep": "expert-parallel size (divides data-parallel size and n_routed_experts)",
    "parallel.nodes": "nodes in the job; 0 = from the launcher's environment",
    "parallel.ranks_per_node": "ranks per node; 0 = from the launcher's environment",
    "parallel.dispatcher": "expert all-to-all: flat, or two_hop (IB to the node, then NVLink; report §3.2.2)",
    "parallel.a2a_chunks": "two_hop: chunks the IB hop is split into, pipelined with the NVLink hop",
    "parallel.overlap": "with DualPipe(V) and ep > 1, run the all-to-all under the paired chunk's compute",
    "parallel.zero1": "shard the optimizer state over data-parallel ranks (ZeRO-1)",
    "parallel.backend": "torch.distributed backend: auto (nccl on CUDA, else gloo), gloo or nccl",
    "parallel.timeout_s": "seconds a collective or pipeline receive may wait before the run fails",
    "parallel.force": "take the parallel (ZeRO-1) path even with one process: a world of 1 surfaces collective bugs",
    # data
    "data.path": "corpus file or folder of .txt, .md, .py or .jsonl files; null = the embedded standard-library corpus",
    "data.tokenizer": "bpe or sentencepiece (trained on the corpus), or the path of a .model / tokenizer.json",
    "data.tokenizer_sample_mb": "megabytes of corpus text the tokenizer is trained on",
    "data.seq_len": "tokens per training sequence",
    "data.val_fraction": "share of documents held out for validation",
    "data.fim_rate": "share of documents rewritten as Fill-in-the-Middle, PSM (report §4.1: 0.1)",
    "data.domain_field": "jsonl field naming each document's domain (per-domain expert load); null = none",
    "data.cache_dir": "folder for the trained tokenizer and the packed token files",
    # train
    "train.steps": "optimizer steps of the run",
    "train.micro_batch_size": "sequences per forward pass, in every layout; auto: the largest that splits the "
                              "replica's batch (global_batch / dp; with a ramp, gcd(global_batch, start_sequences) / dp) "
                              "into a micro-batch count the schedule accepts (1 forward without a pipeline, >= pp for "
                              "1F1B / ZB1P, an even count >= 2·pp for DualPipe, >= 2·pp for DualPipeV)",
    "train.global_batch": "sequences per optimizer step over all data-parallel replicas",
    "train.lr": "peak learning rate, reached after warmup",
    "train.warmup_steps": "steps of linear warmup from 0 to lr",
    "train.lr_segments": "schedule after warmup: a list of segments; empty = hold lr",
    "train.lr_segments[].kind": "constant (hold lr for tokens), cosine (anneal to lr) or step (jump to lr)",
    "train.lr_segments[].tokens": "training tokens the segment lasts",
    "train.lr_segments[].lr": "learning rate the segment holds, anneals to or jumps to",
    "train.batch_ramp": "global batch ramp (report §4.2); null = the full batch from step 1; each step's batch is "
                        "rounded down to a multiple of dp × micro_batch_size, never below the schedule's fewest "
                        "micro-batches (pp; 2·pp for DualPipe(V)), an even count under DualPipe",
    "train.batch_ramp.start_sequences": "global batch in sequences at the start of the ramp",
    "train.batch_ramp.tokens": "training tokens over which the batch grows linearly to global_batch",
    "train.weight_decay": "AdamW decoupled weight decay (report: 0.1)",
    "train.beta1": "AdamW first-moment decay (report: 0.9)",
    "train.beta2": "AdamW second-moment decay (report: 0.95)",
    "train.eps": "AdamW epsilon",
    "train.grad_clip": "clip the global gradient norm to this (report: 1.0); 0 = no clipping",
    "train.dtype": "compute dtype of the non-FP8 parts: auto (BF16 on CUDA and CPUs with native BF16 GEMMs, else FP32), fp32 or bf16 (autocast)",
    "train.peak_tflops": "MFU denominator per device in TFLOPS; unset = the GPU table (dsv3/tools/hardware.py) or the computed CPU peak",
    "train.profile_steps": "[a, b]: a torch.profiler Chrome trace and top-ops table of steps a..b into RUN/profile/",
    "train.wandb": "W&B project name: the TensorBoard scalars are logged there too (needs the [wandb] extra)",
    "train.loss_curve": "write RUN/loss_curve.png (train and validation loss, LR) at the end of the run",
    "train.bf16_moments": "keep AdamW moments in BF16 (report §3.3.3)",
    "train.weights_dtype": "compute weights under ZeRO-1: fp32, or bf16 (BF16 parameters, FP32 main-grad buffers, FP32 master shard rounded back each step; needs BF16 autocast; report §3.3), or auto: bf16 on CUDA under BF16 autocast (as dsv3.tools.plan assumes), fp32 on a CPU and in one process",
    "train.recompute": "recompute RMSNorm, MLA up-projections with the attention core, and SwiGLU in backward (report §3.2.3)",
    "train.seed": "seed of the initialisation and the sampler's order",
    "train.out_dir": "run folder: checkpoints, metrics.jsonl, TensorBoard, the copied tokenizer",
    "train.ckpt_every": "checkpoint every N steps; 0 = only at the end",
    "train.resume": "none, auto (the newest checkpoint in out_dir) or the path of a checkpoint folder",
    "train.init_from": "fresh start (step 0) from these weights: a dsv3 run, ckpt_* or Hugging Face folder",
    "train.overwrite": "with resume=none, replace the checkpoints already in out_dir",
    "train.keep_last": "keep only the newest N checkpoints; 0 = keep all",
    "train.max_skipped_steps": "consecutive non-finite steps skipped before the run stops with exit 3",
    "train.time_limit_s": "stop cleanly (checkpoint, exit 0) before this wall-clock budget; 0 = none",
    "train.lock_stale_s": "a run lock whose heartbeat is older than this many seconds is taken over",
    "train.log_every": "print a step line every N steps (metrics.jsonl gets every step)",
    "train.eval_every": "validation loss every N steps; 0 = only at the end",
    "train.eval_batches": "validation batches per evaluation",
    "train.sample_tokens": "tokens of the greedy sample printed at the end; 0 = none",
    "train.sample_prompt": "prompt of the end-of-run sample",
}

SYMBOL: dict[str, str] = {  # the report's (and DeepSeek-V2's for MLA) symbol beside the field that holds it
    "model.dim": "d",
    "model.mla.n_heads": "n_h", "model.mla.q_lora_rank": "d_c'", "model.mla.kv_lora_rank": "d_c",
    "model.mla.qk_nope_head_dim": "d_h", "model.mla.qk_rope_head_dim": "d_h^R", "model.mla.v_head_dim": "d_h",
    "model.mla.rope_scaling.factor": "s", "model.mla.rope_scaling.beta_fast": "β",
    "model.mla.rope_scaling.beta_slow": "α (YaRN)",
    "model.moe.n_routed_experts": "N_r", "model.moe.n_shared_experts": "N_s", "model.moe.n_activated_experts": "K_r",
    "model.moe.topk_group": "M", "model.moe.bias_update_speed": "γ", "model.moe.aux_loss_alpha": "α",
    "model.mtp.depth": "D", "model.mtp.lambda_start": "λ", "model.mtp.lambda_end": "λ",
    "train.beta1": "β1", "train.beta2": "β2",
}


class Key(NamedTuple):
    path: str
    type: str
    default: str
    symbol: str
    doc: str


# ------------------------------------------------------------------------------------- the tree
def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in inner) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return tp.__name__


def yaml_value(v) -> str:
    """A default as it would be written in a YAML config."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[]" if not v else repr(v)
    if isinstance(v, str):
        return repr(v) if v == "" or v != v.strip() else v
    if dataclasses.is_dataclass(v):
        return "(section)"
    return repr(v)


def _inner_dataclass(tp):
    """The dataclass a field holds through Optional[...] or list[...], else None."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType, list):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def walk(cls=Config, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    """(dotted path, type, default) of every leaf key and every optional or list section; a plain
    nested dataclass (``model.moe``) is a section, not a key, and is walked into."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path, tp = f"{prefix}{f.name}", hints[f.name]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            yield from walk(tp, path + ".")
            continue
        yield path, tp, default
        inner = _inner_dataclass(tp)
        if inner is not None:
            yield from walk(inner, path + ("[]." if typing.get_origin(tp) is list else "."))


def keys() -> list[Key]:
    return [Key(p, type_name(tp), yaml_value(d), SYMBOL.get(p, ""), DOC.get(p, "")) for p, tp, d in walk()]


def undocumented() -> list[str]:
    return [k.path for k in keys() if not k.doc]


def sections() -> list[tuple[str, str]]:
    """(dotted path, the dataclass's docstring first line) of every plain nested section."""
    out = []

    def visit(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                doc = (tp.__doc__ or "").strip().splitlines()[0] if tp.__doc__ else ""
                out.append((prefix + f.name, "" if doc.startswith(tp.__name__ + "(") else doc))
                visit(tp, prefix + f.name + ".")
    visit(Config, "")
    return out


def _section_of(path: str) -> str:
    best = ""
    for name, _ in sections():
        if path.startswith(name + ".") and len(name) > len(best):
            best = name
    return best


# ----------------------------------------------------------------------------------- rendering
def _norm(s: str) -> str:
    return "".join(c for c in s.lower() if c.isalnum())


def describe(path: str) -> str:
    """One key in full, or every key under a section; an unknown path is a ConfigError naming near ones."""
    path = path.strip()
    ks = keys()
    exact = [k for k in ks if k.path == path]
    under = [k for k in ks if k.path.startswith(path + ".")]
    if not exact and not under:
        near = difflib.get_close_matches(path, [k.path for k in ks] + [s for s, _ in sections()], n=3)
        word = _norm(path.rsplit(".", 1)[-1])   # "topk" finds the key whose meaning says "top-k"
        near += [k.path for k in ks if len(word) >= 3 and word in _norm(k.doc) and k.path not in near]
        hint = f" (did you mean {', '.join(near)}?)" if near else " (python -m dsv3.tools.show_config --help lists them)"
        raise ConfigError(f"no config key '{path}'{hint}")
    if exact and not under:
        k = exact[0]
        lines = [k.path, f"  type:    {k.type}", f"  default: {k.default}"]
        if k.symbol:
            lines.append(f"  symbol:  {k.symbol} (DeepSeek-V3 report)")
        lines.append(f"  {k.doc}")
        return "\n".join(lines)
    return text(exact + under)


def text(ks: Optional[list[Key]] = None) -> str:
    """The reference as aligned plain text, one key per line, a blank line between sections."""
    ks = keys() if ks is None else ks
    width = min(max(len(k.path) for k in ks), 34)    # longer paths push their line right
    twidth = min(max(len(f"{k.type} = {k.default}") for k in ks), 24)
    lines, section = [], None
    for k in ks:
        s = _section_of(k.path)
        if s != section:
            if section is not None:
                lines.append("")
            section = s
        sym = f"[{k.symbol}] " if k.symbol else ""
        lines.append(f"  {k.path:<{width}}  {f'{k.type} = {k.default}':<{twidth}}  {sym}{k.doc}")
    return "\n".join(lines)


def _md(s: str) -> str:
    return s.replace("|", "\\|")


def markdown() -> str:
    """docs/config.md: one table per section."""
    out = ["# Config reference", "",
           "Generated from the dataclasses of `dsv3/config.py` and the descriptions in `dsv3/config_doc.py`; "
           "`tests/test_config_doc.py` fails when this file is stale (regenerate: "
           "`python -m dsv3.config_doc > docs/config.md`). Print it with `python -m dsv3.tools.show_config --help`, one key "
           "with `python -m dsv3.tools.show_config --describe KEY`.",
           "",
           "Keys are set in a YAML file (nested mappings) or on the command line as `key.path=value`. "
           "Symbols are the DeepSeek-V3 report's (MLA's from DeepSeek-V2).", ""]
    docs = dict(sections())
    by_section: dict[str, list[Key]] = {}
    for k in keys():
        by_section.setdefault(_section_of(k.path), []).append(k)
    for s, ks in by_section.items():
        out += [f"## `{s}`", ""]
        if docs.get(s):
            out += [docs[s], ""]
        out += ["| key | type | default | symbol | meaning |", "|---|---|---|---|---|"]
        out += [f"| `{k.path}` | {_md(k.type)} | `{_md(k.default)}` | {_md(k.symbol)} | {_md(k.doc)} |" for k in ks]
        out.append("")
    return "\n".join(out)


USAGE = """usage: python -m dsv3.tools.show_config CONFIG.yaml [key.path=value ...]
       python -m dsv3.tools.show_config --describe KEY
       python -m dsv3.tools.show_config --help

Prints the resolved config (YAML) and the parameter counts of CONFIG.yaml with the overrides applied.
A YAML file may name `base: other.yaml`; an override is key.path=value, its value parsed as YAML.
--describe KEY   type, default, symbol and meaning of one key (or every key under a section)
--help           this text and the reference of every key (also in docs/config.md)

Config keys (type = default, [report symbol], meaning):
"""


TRAIN_USAGE = """usage: python -m dsv3.train [CONFIG.yaml] [key.path=value ...]
       torchrun --nproc-per-node N -m dsv3.train CONFIG.yaml [key.path=value ...]

Pretrains a DeepSeek-V3-style MoE model. CONFIG.yaml defaults to configs/debug.yaml; every other
argument is an override key.path=value (value parsed as YAML), e.g.
    python -m dsv3.train configs/small_moe.yaml train.steps=200 train.out_dir=runs/mine fp8.enabled=true
Under torchrun (WORLD_SIZE > 1) the ranks split into parallel.pp × data-parallel, experts over parallel.ep.
The run folder train.out_dir gets checkpoints (ckpt_*), metrics.jsonl, TensorBoard scalars and the tokenizer.

Exit codes: 0 finished, or stopped at train.time_limit_s after a checkpoint; 2 a bad config, argument or file
(one line on stderr); 3 diverged (train.max_skipped_steps non-finite steps in a row); 143 / 130 stopped by
SIGTERM / SIGINT after a checkpoint (a second signal stops at once, same code); 1 another rank failed.

Every key: python -m dsv3.tools.show_config --help (or docs/config.md); one key: python -m dsv3.tools.show_config --describe KEY.
Often set:
"""
TRAIN_KEYS = ("train.steps", "train.micro_batch_size", "train.global_batch", "train.lr", "train.dtype",
              "train.out_dir", "train.resume", "train.ckpt_every", "train.eval_every", "data.path", "data.seq_len",
              "fp8.enabled", "parallel.pp", "parallel.pp_schedule", "parallel.ep")


def train_help() -> str:
    """``python -m dsv3.train --help``: usage, exit codes and the keys most runs set."""
    by_path = {k.path: k for k in keys()}
    return TRAIN_USAGE + text([by_path[p] for p in TRAIN_KEYS])


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dsv3.tools.show_config --help | --describe KEY`` (called by dsv3.tools.show_config's main)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--describe":
        if len(argv) != 2:
            print("error: --describe takes one key, e.g. --describe model.moe.n_activated_experts", file=sys.stderr)
            return 2
        try:
            print(describe(argv[1]))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    print(USAGE + text())
    return 0


if __name__ == "__main__":   # python -m dsv3.config_doc > docs/config.md
    print(markdown(), end="")
