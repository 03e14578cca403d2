"""The model's hyper-parameters as frozen dataclasses: what every module of dsv3.model is built from.

Plain data (no YAML, no validation): ``dsv3.config`` loads, type-checks and validates them as the ``model``
section of the config tree; a user building the model in code constructs them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass(frozen=True)
class RopeScaling:
    """YaRN (DeepSeek-V3 long-context stages: factor 40, original 4096, beta 32/1, mscale 1/1)."""
    type: Literal["yarn"] = "yarn"
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention (DeepSeek-V2 §2.1). q_lora_rank None = plain query projection."""
    n_heads: int = 4
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE with the V3 router and aux-loss-free balancing (report §2.1.2)."""
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    moe_inter_dim: int = 64
    n_activated_experts: int = 4             # K_r, top-k
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # router variants: names in dsv3/model/router.py's tables (built in: sigmoid | softmax; noaux_tc |
    # group_limited_greedy | greedy; sign | proportional | none), checked by dsv3.config's validate
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    bias_update: str = "sign"
    bias_update_speed: float = 1e-3          # γ
    bias_update_stop_tokens: Optional[int] = None   # γ → 0 after this many tokens (report: 14.3T)
    aux_loss_alpha: float = 1e-4             # α of the complementary sequence-wise loss; 0 = off
    aux_loss_type: Literal["sequence", "batch"] = "sequence"
    grouped_mm_impl: Literal["auto", "loop", "segments", "grouped_mm"] = "auto"


@dataclass(frozen=True)
class MTPConfig:
    """Multi-Token Prediction (report §2.2): D modules, loss weight λ1 then λ2 after a token count."""
    depth: int = 1                           # D; 0 = no MTP
    lambda_start: float = 0.3
    lambda_end: float = 0.1
    lambda_switch_tokens: Optional[int] = None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_dense_layers: int = 1                  # first_k_dense_replace
    inter_dim: int = 256                     # dense FFN width
    norm_eps: float = 1e-6
    init_std: float = 0.006
    max_seq_len: int = 4096
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
