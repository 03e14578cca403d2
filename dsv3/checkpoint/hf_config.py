"""config.json of DeepSeek-V3 / V2 checkpoints <-> our ModelConfig.

Reads the released layout (``rope_theta`` + ``rope_scaling``) and transformers 5's (``rope_parameters``);
writes the released one, which transformers, vLLM and SGLang all read. Keys absent from a config.json
take transformers' defaults for its model_type, so both sides compute the same model.
"""
from __future__ import annotations

from typing import Optional

from dsv3.config import (Config, ConfigError, DataConfig, MLAConfig, ModelConfig, MoEConfig, MTPConfig,
                         RopeScaling, validate)
from dsv3.errors import CheckpointError
from dsv3.model import router

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
# the router variants (dsv3/model/router.py) a config.json can express: transformers' DeepSeek routers
# implement these and no others, so a variant registered beyond them trains but is not exported
HF_SCORING_FUNCS = ("sigmoid", "softmax")
HF_TOPK_METHODS = {"noaux_tc": "deepseek_v3", "group_limited_greedy": "deepseek_v2", "greedy": "deepseek_v2"}

# transformers' defaults where a config.json may leave a routing key out
_DEFAULTS = {
    "deepseek_v3": dict(n_group=8, topk_group=4, routed_scaling_factor=2.5, scoring_func="sigmoid",
                        topk_method="noaux_tc", norm_topk_prob=True, first_k_dense_replace=3,
                        n_shared_experts=1, rope_interleave=True, num_nextn_predict_layers=1),
    "deepseek_v2": dict(n_group=None, topk_group=None, routed_scaling_factor=1.0, scoring_func="softmax",
                        topk_method="greedy", norm_topk_prob=False, first_k_dense_replace=0,
                        n_shared_experts=2, rope_interleave=True, num_nextn_predict_layers=0),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
             "moe_intermediate_size", "num_experts_per_tok")


def _rope(hf: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    params = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise CheckpointError(f"{where}: rope scaling '{kind}' is not supported (only yarn)")
    if scaling.get("attention_factor") is not None or scaling.get("truncate", True) is not True:
        raise CheckpointError(f"{where}: yarn with attention_factor or truncate=false is not supported")
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else hf["max_position_embeddings"] / original
    # transformers reads an absent mscale as "use factor alone", which our RopeScaling spells as 0
    return theta, RopeScaling(
        factor=factor, original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32), beta_slow=float(scaling.get("beta_slow") or 1),
        mscale=float(scaling.get("mscale") or 0.0), mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0))


def config_from_hf(hf: dict, mtp_depth: Optional[int] = None, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a config.json dict. ``mtp_depth`` overrides num_nextn_predict_layers (the
    loader passes the number of MTP layers actually stored: transformers' save_pretrained drops them)."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported (expected one of {', '.join(MODEL_TYPES)})")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: missing key '{missing[0]}'")
    d = dict(_DEFAULTS[model_type])
    d.update({k: v for k, v in hf.items() if k in d and v is not None})
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{where}: attention_bias / mlp_bias are not supported")
    if hf.get("moe_layer_freq", 1) != 1:
        raise CheckpointError(f"{where}: moe_layer_freq {hf['moe_layer_freq']} is not supported (1 only)")
    theta, scaling = _rope(hf, where)
    n_layers = int(hf["num_hidden_layers"])
    depth = int(d["num_nextn_predict_layers"] or 0) if mtp_depth is None else mtp_depth
    try:
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]), dim=int(hf["hidden_size"]), n_layers=n_layers,
            n_dense_layers=min(int(d["first_k_dense_replace"] or 0), n_layers),
            inter_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.006)),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            mla=MLAConfig(
                n_heads=int(hf["num_attention_heads"]),
                q_lora_rank=int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None,
                kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]),
                rope_theta=theta, rope_scaling=scaling),
            moe=MoEConfig(
                n_routed_experts=int(hf["n_routed_experts"]), n_shared_experts=int(d["n_shared_experts"] or 0),
                moe_inter_dim=int(hf["moe_intermediate_size"]), n_activated_experts=int(hf["num_experts_per_tok"]),
                n_group=int(d["n_group"] or 1), topk_group=int(d["topk_group"] or 1),
                routed_scaling_factor=float(d["routed_scaling_factor"]), scoring_func=d["scoring_func"],
                topk_method=d["topk_method"], norm_topk_prob=bool(d["norm_topk_prob"])),
            mtp=MTPConfig(depth=depth))
        validate(Config(model=cfg, data=DataConfig(seq_len=min(DataConfig.seq_len, cfg.max_seq_len))))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    check_hf_router(cfg.moe, where)
    return cfg


def check_hf_router(moe: MoEConfig, where: str) -> None:
    """CheckpointError unless the Hugging Face format expresses the router's scoring_func and
    topk_method (HF_SCORING_FUNCS, HF_TOPK_METHODS); the message tells a registered variant the format
    lacks from a name no table of dsv3/model/router.py holds."""
    for key, expressible in (("scoring_func", HF_SCORING_FUNCS), ("topk_method", tuple(HF_TOPK_METHODS))):
        name = getattr(moe, key)
        if name not in expressible:
            what = " (a router variant registered in dsv3/model/router.py)" if name in router.names(key) else ""
            raise CheckpointError(f"{where}: {key} {name!r}{what} is not supported by the Hugging Face DeepSeek "
                                  f"format, which expresses {', '.join(expressible)}")


def rope_interleaved(hf: dict) -> bool:
    """False when a V3 config asks transformers for rotate-half RoPE (the loader then permutes rows)."""
    return bool(hf.get("rope_interleave", True)) or hf.get("model_type") != "deepseek_v3"


def hf_model_type(cfg: ModelConfig) -> str:
    """V3 architecture for the noaux_tc router, V2 for the others (HF_TOPK_METHODS); CheckpointError for
    a router the format cannot express."""
    check_hf_router(cfg.moe, "config.json export")
    return HF_TOPK_METHODS[cfg.moe.topk_method]


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "bfloat16", fp8: bool = False,
                 bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None) -> dict:
    """config.json in the released layout (config_671B.json's keys on the left, dsv3.model.args fields on the right)."""
    mla, moe = cfg.mla, cfg.moe
    model_type = hf_model_type(cfg)
    arch = "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    out = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": moe.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.mtp.depth,
        "num_attention_heads": mla.n_heads, "num_key_value_heads": mla.n_heads,
        "n_shared_experts": moe.n_shared_experts, "n_routed_experts": moe.n_routed_experts,
        "routed_scaling_factor": moe.routed_scaling_factor, "kv_lora_rank": mla.kv_lora_rank,
        "q_lora_rank": mla.q_lora_rank, "qk_rope_head_dim": mla.qk_rope_head_dim,
        "v_head_dim": mla.v_head_dim, "qk_nope_head_dim": mla.qk_nope_head_dim,
        "topk_method": moe.topk_method, "n_group": moe.n_group, "topk_group": moe.topk_group,
        "num_experts_per_tok": moe.n_activated_experts, "moe_layer_freq": 1,
        "first_k_dense_replace": cfg.n_dense_layers, "norm_topk_prob": moe.norm_topk_prob,
        "scoring_func": moe.scoring_func, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "use_cache": True, "tie_word_embeddings": False,
        "rope_theta": mla.rope_theta, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }
    if mla.rope_scaling is not None:
        s = mla.rope_scaling
        out["rope_scaling"] = {"type": "yarn", "factor": s.factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings,
                               "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                               "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim}
    if bos_token_id is not None:
        out["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        out["eos_token_id"] = eos_token_id
    if fp8:
        out["quantization_config"] = fp8_quantization_config()
    return out


def fp8_quantization_config() -> dict:
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
