"""One frozen, typed config tree (model, moe, mla, mtp, fp8, parallel, data, train).

YAML is loaded strictly: an unknown key or a value of the wrong type is a ``ConfigError`` naming the
key's path and what was expected (``model.moe.n_activated_experts: expected int, got 'eight'``).
A YAML file may name ``base: other.yaml`` (relative to itself); its keys override the base's.
CLI overrides ``a.b.c=value`` are parsed as YAML scalars and type-checked the same way.

``python -m dsv3.tools.show_config configs/X.yaml [overrides...]`` prints the resolved config and the
parameter counts, computed on the meta device.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from dsv3.errors import UserError
from dsv3.model import router   # the router variants' tables (model.moe.scoring_func, topk_method, bias_update)
from dsv3.model.args import MLAConfig, MoEConfig, MTPConfig, ModelConfig, RopeScaling  # the model section of the tree


class ConfigError(UserError):
    """A user mistake in a config file or override; the message says what to change."""


# --------------------------------------------------------------------------------------------- tree
@dataclass(frozen=True)
class FP8Config:
    """FP8 (E4M3) GEMMs with 1×128 activation and 128×128 weight scales (report §3.3)."""
    enabled: bool = False
    backend: Literal["auto", "triton", "torch", "te"] = "auto"
    block: int = 128
    dispatch: bool = True                    # MoE dispatch in FP8 with power-of-2 scales
    grad_dispatch: bool = True               # EP backward: the gradient before the down-projection in FP8, pow2 scales (report §3.3.3)
    cache_wo_e5m6: bool = True               # wo's input cached in E5M6, power-of-2 scales (report §3.3.3)
    cache_swiglu_fp8: bool = True            # SwiGLU input (routed and shared experts, dense FFN) cached in FP8, output recomputed (report §3.3.3)
    high_precision: list[str] = field(default_factory=list)  # GEMM passes left unquantised: CLASS.PASS, CLASS in
                                             # attention/dense/experts, PASS in fprop/dgrad/wgrad (a diagnostic)


@dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1
    pp_schedule: str = "1f1b"                # a name in parallel/schedules.SCHEDULES (checked in validate)
    ep: int = 1
    nodes: int = 0                           # 0 = from the launcher's environment
    ranks_per_node: int = 0                  # 0 = from the launcher's environment
    dispatcher: Literal["flat", "two_hop"] = "two_hop"
    a2a_chunks: int = 1                      # two_hop: IB hop pipelined with the NVLink hop in this many chunks
    overlap: bool = True                     # DualPipe(V), ep > 1: all-to-all under the paired chunk (§3.2.1)
    zero1: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 300.0                 # a collective or pipeline receive waiting longer fails the run
    force: bool = False                      # take the parallelize() path (ZeRO-1) even with one process: a
                                             # process group of world size 1 surfaces collective/device bugs


@dataclass(frozen=True)
class DataConfig:
    """path None = the embedded corpus (this interpreter's standard-library .py sources)."""
    path: Optional[str] = None
    tokenizer: str = "bpe"                   # bpe | sentencepiece (trained) | path to .model / tokenizer.json
    tokenizer_sample_mb: float = 4.0
    seq_len: int = 128
    val_fraction: float = 0.02
    fim_rate: float = 0.0                    # report: 0.1 PSM on code
    domain_field: Optional[str] = None
    cache_dir: str = ".cache/dsv3"


@dataclass(frozen=True)
class LRSegment:
    """After warmup: constant (hold `lr` for `tokens`), cosine (anneal to `lr`), step (jump to `lr`)."""
    kind: Literal["constant", "cosine", "step"] = "constant"
    tokens: int = 0
    lr: float = 0.0


@dataclass(frozen=True)
class BatchRamp:
    """Global batch grows linearly from start_sequences to the full batch over `tokens` (report §4.2)."""
    start_sequences: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    micro_batch_size: Union[int, Literal["auto"]] = 8   # sequences per forward, in every layout (auto: dsv3/data/batch.py)
    global_batch: int = 8                    # sequences per optimizer step over all data-parallel replicas (dsv3/data/batch.py)
    lr: float = 1e-3
    warmup_steps: int = 10
    lr_segments: list[LRSegment] = field(default_factory=list)
    batch_ramp: Optional[BatchRamp] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: Literal["auto", "fp32", "bf16"] = "auto"   # auto: BF16 on CUDA and CPUs with native BF16, else FP32 (dsv3/training/runtime.py)
    bf16_moments: bool = False
    weights_dtype: Literal["auto", "fp32", "bf16"] = "auto"   # bf16: BF16 compute weights, FP32 main grads and ZeRO-1 master (parallel/zero.py); auto: bf16 on CUDA under BF16 autocast
    recompute: bool = False
    seed: int = 0
    out_dir: str = "runs/debug"
    ckpt_every: int = 0                      # 0 = only at the end
    resume: str = "none"                     # none | auto | path to a checkpoint folder
    init_from: Optional[str] = None          # fresh start from these weights + biases (dsv3 run/ckpt or HF folder), step 0
    overwrite: bool = False                  # resume=none into a folder that holds checkpoints: replace them
    keep_last: int = 0                       # keep only the newest N checkpoints (0 = keep all)
    max_skipped_steps: int = 5               # consecutive non-finite steps skipped before the run stops (exit 3)
    time_limit_s: float = 0.0                # stop cleanly (checkpoint, exit 0) before this wall-clock budget; 0 = none
    lock_stale_s: float = 120.0              # a run lock whose heartbeat is older than this is taken over
    log_every: int = 1
    eval_every: int = 0
    eval_batches: int = 8
    sample_tokens: int = 48
    sample_prompt: str = "def "
    peak_tflops: Optional[float] = None      # MFU denominator per device; None = the hardware table / computed CPU peak
    profile_steps: list[int] = field(default_factory=list)   # [a, b]: torch.profiler trace of steps a..b into RUN/profile
    wandb: Optional[str] = None              # W&B project: log the TensorBoard scalars there too (the [wandb] extra)
    loss_curve: bool = True                  # write RUN/loss_curve.png at the end of the run


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- strict conversion
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path)
        for one in inner:   # e.g. int or 'auto': the first type that takes the value
            try:
                return _convert(one, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
            return int(value)  # 14.3e12 tokens written in float notation
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")


REMOVED = {  # keys of older configs: one line saying what replaced them
    "train.grad_accum": "set train.global_batch (sequences per optimizer step over all data-parallel replicas = "
                        "the old micro_batch_size × grad_accum × dp)",
    "parallel.num_chunks": "pipeline micro-batches are train.global_batch / (dp × train.micro_batch_size)",
    "model.linear_impl": "fp8.enabled=true is the one switch for FP8 GEMMs",
}


def _build(cls, data: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        for k in unknown:
            if f"{where}{k}" in REMOVED:
                raise ConfigError(f"{where}{k} was removed: {REMOVED[where + k]}")
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in first_line:
                        raise ConfigError(f"line {line}: key '{key}' is given twice (first on line "
                                          f"{first_line[key]}); keep one")
                    first_line[key] = line
                except TypeError:   # an unhashable key: SafeLoader names it below
                    continue
        return super().construct_mapping(node, deep)


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's message on one line: 'line L, column C: problem (context)'."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return where + problem + (f" ({context})" if context else "")


def _read_yaml(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' includes form a cycle")
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; give the path of a YAML file")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror}); check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error_line(e)}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}, {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: 'base' must name a YAML file, got {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.exists(base_path):
            raise ConfigError(f"{path}: base config file not found: {os.path.abspath(base_path)}")
        data = _merge(_read_yaml(base_path, seen + (path,)), data)
    return data


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as e:
        raise ConfigError(f"override '{text}': {str(e).split(': ', 1)[-1]}") from None  # drop "line 1: "
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        nested: object = value
        for k in reversed(keys):
            nested = {k: nested}
        data = _merge(data, nested)  # type: ignore[arg-type]
    return data


# --------------------------------------------------------------------------------------- validation
# Checked at load, before any data preparation, so a bad value costs nothing and names its key.
# Optional keys (None) are skipped; a None parent (rope_scaling, batch_ramp) skips its children.
_INT_AT_LEAST_1 = (  # sizes and counts; a 0 divides by zero or builds an empty layer
    "model.vocab_size", "model.dim", "model.n_layers", "model.inter_dim", "model.max_seq_len",
    "model.mla.n_heads", "model.mla.q_lora_rank", "model.mla.kv_lora_rank", "model.mla.qk_nope_head_dim",
    "model.mla.qk_rope_head_dim", "model.mla.v_head_dim", "model.mla.rope_scaling.original_max_position_embeddings",
    "model.moe.n_routed_experts", "model.moe.moe_inter_dim", "model.moe.n_activated_experts", "model.moe.n_group",
    "model.moe.topk_group", "fp8.block", "parallel.pp", "parallel.ep", "data.seq_len",
    "train.global_batch", "train.max_skipped_steps", "train.log_every", "train.eval_batches")
_INT_AT_LEAST_0 = (  # 0 means off / none / automatic
    "model.n_dense_layers", "model.moe.n_shared_experts", "model.moe.bias_update_stop_tokens", "model.mtp.depth",
    "model.mtp.lambda_switch_tokens", "parallel.nodes", "parallel.ranks_per_node",
    "train.steps", "train.warmup_steps", "train.seed", "train.ckpt_every", "train.keep_last", "train.eval_every",
    "train.sample_tokens", "train.batch_ramp.start_sequences", "train.batch_ramp.tokens")
_FLOAT_POSITIVE = (
    "model.norm_eps", "model.init_std", "model.mla.rope_scaling.factor", "model.mla.rope_scaling.beta_fast",
    "model.mla.rope_scaling.beta_slow", "model.moe.routed_scaling_factor", "parallel.timeout_s",
    "data.tokenizer_sample_mb", "train.eps", "train.lock_stale_s")
_FLOAT_AT_LEAST_0 = (
    "model.mla.rope_scaling.mscale", "model.mla.rope_scaling.mscale_all_dim", "model.moe.bias_update_speed",
    "model.moe.aux_loss_alpha", "model.mtp.lambda_start", "model.mtp.lambda_end", "train.lr", "train.weight_decay",
    "train.grad_clip", "train.time_limit_s")
_NON_EMPTY = {  # an empty path would silently mean the current folder
    "data.path": "a corpus file or folder, or null for the embedded corpus",
    "data.tokenizer": "bpe, sentencepiece or the path of a tokenizer file",
    "data.domain_field": "a jsonl field name, or null",
    "data.cache_dir": "a folder for the tokenizer and packed data (default .cache/dsv3)",
    "train.out_dir": "the run's folder (e.g. runs/mine)",
    "train.resume": "none, auto or a checkpoint folder",
    "train.init_from": "a dsv3 run or ckpt_* folder, a Hugging Face DeepSeek-V3 folder, or null"}


def _get(cfg, key: str):
    for part in key.split("."):
        if cfg is None:
            return None
        cfg = getattr(cfg, part)
    return cfg


def _check_finite(obj, path: str = "") -> None:
    """Every float in the tree is finite: a nan or inf learning rate, scale or epsilon trains to NaN."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for k, v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{k} must be a finite number, got {v}")
            if dataclasses.is_dataclass(v):
                _check_finite(v, k)


def _check_ranges(cfg: "Config") -> None:
    for keys, ok, want in ((_INT_AT_LEAST_1, lambda v: v >= 1, ">= 1"), (_INT_AT_LEAST_0, lambda v: v >= 0, ">= 0"),
                           (_FLOAT_POSITIVE, lambda v: v > 0, "> 0"), (_FLOAT_AT_LEAST_0, lambda v: v >= 0, ">= 0")):
        for key in keys:
            value = _get(cfg, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key} must be {want}, got {value}")
    for key, want in _NON_EMPTY.items():
        value = _get(cfg, key)
        if value is not None and not value.strip():
            raise ConfigError(f"{key} is empty; set it to {want}")
    for i, seg in enumerate(cfg.train.lr_segments):
        if seg.tokens < 0 or seg.lr < 0:
            raise ConfigError(f"train.lr_segments[{i}]: tokens and lr must be >= 0, "
                              f"got tokens={seg.tokens}, lr={seg.lr}")
    mbs = cfg.train.micro_batch_size
    ranges = ((mbs == "auto" or mbs >= 1, f"train.micro_batch_size must be >= 1 or auto, got {mbs}"),
              (cfg.model.mla.rope_theta > 1, f"model.mla.rope_theta must be > 1, got {cfg.model.mla.rope_theta}"),
              (0 <= cfg.train.beta1 < 1, f"train.beta1 must be in [0, 1), got {cfg.train.beta1}"),
              (0 <= cfg.train.beta2 < 1, f"train.beta2 must be in [0, 1), got {cfg.train.beta2}"),
              (0.0 < cfg.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}"),
              (0.0 <= cfg.data.fim_rate <= 1.0, f"data.fim_rate must be in [0, 1], got {cfg.data.fim_rate}"))
    for ok, msg in ranges:
        if not ok:
            raise ConfigError(msg)
    ps = cfg.train.profile_steps
    if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1] <= cfg.train.steps):
        raise ConfigError(f"train.profile_steps must be [a, b] with 1 <= a <= b <= train.steps={cfg.train.steps}, "
                          f"got {list(ps)}")
    if cfg.train.peak_tflops is not None and not cfg.train.peak_tflops > 0:
        raise ConfigError(f"train.peak_tflops must be > 0 TFLOPS per device, got {cfg.train.peak_tflops}")


def _layout_checks(cfg: "Config") -> list[tuple[bool, str]]:
    """What parallel/ needs of pp, its schedule and the global batch, checkable without the world size
    (the batch split is checked again with the real dp at start: dsv3/data/batch.py ``check_layout``)."""
    from dsv3.data.batch import check_layout
    from parallel.schedules import SCHEDULES   # pure data: imports nothing from dsv3
    pc, t = cfg.parallel, cfg.train
    if pc.pp_schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule: expected one of {', '.join(map(repr, SCHEDULES))}, got "
                          f"{pc.pp_schedule!r} (pipeline schedules: parallel/schedules.py)")
    sched = SCHEDULES[pc.pp_schedule]
    try:
        check_layout(t, 1, pc.pp, pc.pp_schedule)   # dp = 1 gives the most micro-batches a layout can have
        split = (True, "")
    except UserError as e:
        split = (False, str(e).replace(" over dp=1 × ", " over ").replace("(dp=1 × ", "("))
    checks = [(pc.zero1 or (pc.pp == 1 and pc.ep == 1),
               f"parallel.zero1=false works only with plain data parallelism (pp=1, ep=1), got pp={pc.pp}, ep={pc.ep}: "
               f"the pipeline and expert-parallel trainer shards the optimizer state (ZeRO-1)")]
    if pc.pp > 1:
        stages = sched.num_model_stages(pc.pp)
        checks += [
            (stages <= cfg.model.n_layers, f"parallel.pp={pc.pp} with {pc.pp_schedule} needs {stages} model stages but "
                                           f"model.n_layers={cfg.model.n_layers}; lower parallel.pp or add layers"),
            (not sched.even_ranks or pc.pp % 2 == 0,
             f"parallel.pp_schedule={pc.pp_schedule} needs an even parallel.pp, got {pc.pp}"
             + (f"; use {sched.odd_ranks_instead} for an odd one" if sched.odd_ranks_instead else ""))]
    return checks + [split, (t.batch_ramp is None or t.batch_ramp.start_sequences <= t.global_batch,
                             "train.batch_ramp.start_sequences must be <= train.global_batch")]


def _check_router(moe: MoEConfig) -> None:
    """scoring_func, topk_method and bias_update name entries of dsv3/model/router.py's tables (which a
    user's code may extend with its register_* functions)."""
    for key in router.FIELDS:
        name, known = getattr(moe, key), router.names(key)
        if name not in known:
            raise ConfigError(f"model.moe.{key}: expected one of {', '.join(map(repr, known))}, got {name!r} "
                              f"(router variants: dsv3/model/router.py)")


FP8_GEMM_CLASSES = ("attention", "dense", "experts")   # fp8.high_precision's classes (dsv3.training.precision)
FP8_PASSES = ("fprop", "dgrad", "wgrad")                # = triton_kernels.high_precision.PASSES


def fp8_high_precision(f: FP8Config) -> dict[str, frozenset]:
    """fp8.high_precision as {class: passes} for every class (empty sets included); ConfigError on a bad name."""
    out: dict[str, set] = {c: set() for c in FP8_GEMM_CLASSES}
    for name in f.high_precision:
        cls, _, p = name.partition(".")
        if cls not in out or p not in FP8_PASSES:
            raise ConfigError(f"fp8.high_precision: {name!r} is not CLASS.PASS with CLASS in "
                              f"{', '.join(FP8_GEMM_CLASSES)} and PASS in {', '.join(FP8_PASSES)}")
        out[cls].add(p)
    return {c: frozenset(v) for c, v in out.items()}


def _fp8_pass_checks(f: FP8Config) -> list[tuple[bool, str]]:
    fp8_high_precision(f)
    return [(not f.high_precision or f.backend != "te",
             "fp8.high_precision is not available with fp8.backend=te (its Linears are Transformer Engine modules); "
             "use fp8.backend=auto")]


def validate(cfg: Config) -> Config:
    _check_router(cfg.model.moe)
    _check_finite(cfg)
    _check_ranges(cfg)
    m, moe, mla, t = cfg.model, cfg.model.moe, cfg.model.mla, cfg.train
    per_group = moe.n_routed_experts // moe.n_group
    group_top = router.topk_method(moe.topk_method).group_score_experts
    checks = [
        (moe.n_activated_experts <= moe.n_routed_experts, "model.moe.n_activated_experts must be <= n_routed_experts"),
        (moe.n_routed_experts % moe.n_group == 0, "model.moe.n_routed_experts must be divisible by n_group"),
        (1 <= moe.topk_group <= moe.n_group, "model.moe.topk_group must be in [1, n_group]"),
        (moe.n_activated_experts <= moe.topk_group * per_group,
         "model.moe.n_activated_experts exceeds the experts in topk_group groups"),
        (moe.n_group == 1 or per_group >= group_top,
         f"model.moe.n_group={moe.n_group} leaves {per_group} expert per group, but {moe.topk_method} scores a group "
         f"by its top-{group_top} experts; lower n_group to at most {moe.n_routed_experts // group_top}"),
        (m.n_dense_layers <= m.n_layers, "model.n_dense_layers must be in [0, n_layers]"),
        (mla.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim must be even"),
        (cfg.data.seq_len <= m.max_seq_len, "data.seq_len must be <= model.max_seq_len"),
        (cfg.fp8.block == 128, f"fp8.block={cfg.fp8.block}: the FP8 kernels implement 128 (1×128 and 128×128 tiles); "
                               f"set it to 128"),
        *_fp8_pass_checks(cfg.fp8),
        (moe.n_routed_experts % cfg.parallel.ep == 0,
         f"parallel.ep={cfg.parallel.ep} does not divide model.moe.n_routed_experts={moe.n_routed_experts}"),
        (t.sample_tokens == 0 or t.sample_prompt != "",
         "train.sample_prompt is empty; give a prompt or set train.sample_tokens=0"),
        *_layout_checks(cfg),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when path is None), apply CLI overrides, validate."""
    data = _read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return validate(_build(Config, data))


def from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of cfg with `a.b.c=value` overrides applied (strictly checked)."""
    return validate(_build(Config, apply_overrides(to_dict(cfg), overrides)))
