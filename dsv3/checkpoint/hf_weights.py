"""Tensor names of the released DeepSeek-V3 / V2 checkpoints <-> our parameter names, and which
tensors the released FP8 checkpoint quantises.

    model.embed_tokens.weight                         embed.weight
    model.layers.{i}.input_layernorm.weight           layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.q_a_proj.weight        layers.{i}.attn.wq_a.weight          (W_DQ)
    model.layers.{i}.self_attn.kv_a_proj_with_mqa     layers.{i}.attn.wkv_a.weight         ([W_DKV; W_KR])
    model.layers.{i}.mlp.experts.{j}.gate_proj        layers.{i}.ffn.experts.w1[j]         (stacked here)
    model.layers.{n+k}.enorm / hnorm / eh_proj        mtp.{k}.enorm / hnorm / eh_proj
    model.layers.{n+k}.shared_head.norm               mtp.{k}.norm
    model.layers.{n+k}.embed_tokens, shared_head.head copies of embed.weight / head.weight (shared here)
    lm_head.weight                                    head.weight

transformers 5 may store the experts fused: ``mlp.experts.gate_up_proj`` (E, 2I, H) = [w1; w3] and
``mlp.experts.down_proj`` (E, H, I) = w2; the loader accepts both layouts, the writer emits the released one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from dsv3.config import ModelConfig
from dsv3.model.router import topk_method


@dataclass(frozen=True)
class Slot:
    hf: str                       # tensor name in the checkpoint
    ours: str                     # key in Transformer.state_dict()
    expert: Optional[int] = None  # row of a stacked expert tensor
    copy: bool = False            # a stored copy of a tensor we share (MTP embed_tokens, shared_head.head)


_ATTN = [("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
         ("self_attn.q_proj.weight", "attn.wq.weight"), ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
         ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight"), ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
         ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight"),
         ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight"),
         ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight"), ("self_attn.o_proj.weight", "attn.wo.weight")]
_FFN = [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")]
# the Linear layers the released FP8 checkpoint stores in E4M3 with a weight_scale_inv
FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj"}
SCALE_SUFFIX = "_scale_inv"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _block_slots(hf_prefix: str, our_prefix: str, dense: bool, cfg: ModelConfig) -> list[Slot]:
    slots = []
    for hf, ours in _ATTN:
        if ("q_proj" in hf and cfg.mla.q_lora_rank is not None) or \
           (("q_a_" in hf or "q_b_" in hf) and cfg.mla.q_lora_rank is None):
            continue
        slots.append(Slot(hf_prefix + hf, our_prefix + ours))
    if dense:
        return slots + [Slot(f"{hf_prefix}mlp.{h}.weight", f"{our_prefix}ffn.{o}.weight") for h, o in _FFN]
    slots.append(Slot(hf_prefix + "mlp.gate.weight", our_prefix + "ffn.gate.weight"))
    if topk_method(cfg.moe.topk_method).biased:   # the routing bias b of aux-loss-free balancing
        slots.append(Slot(hf_prefix + "mlp.gate.e_score_correction_bias", our_prefix + "ffn.gate.e_score_correction_bias"))
    for j in range(cfg.moe.n_routed_experts):
        slots += [Slot(f"{hf_prefix}mlp.experts.{j}.{h}.weight", f"{our_prefix}ffn.experts.{o}", j) for h, o in _FFN]
    if cfg.moe.n_shared_experts:
        slots += [Slot(f"{hf_prefix}mlp.shared_experts.{h}.weight", f"{our_prefix}ffn.shared_experts.{o}.weight")
                  for h, o in _FFN]
    return slots


def hf_slots(cfg: ModelConfig) -> list[Slot]:
    """Every tensor of the released layout, in the released order (embedding, layers, norm, head, MTP)."""
    slots = [Slot("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.n_layers):
        slots += _block_slots(f"model.layers.{i}.", f"layers.{i}.", i < cfg.n_dense_layers, cfg)
    slots += [Slot("model.norm.weight", "norm.weight"), Slot("lm_head.weight", "head.weight")]
    for k in range(cfg.mtp.depth):
        p, q = f"model.layers.{cfg.n_layers + k}.", f"mtp.{k}."
        slots += [Slot(p + "embed_tokens.weight", "embed.weight", copy=True),
                  Slot(p + "enorm.weight", q + "enorm.weight"), Slot(p + "hnorm.weight", q + "hnorm.weight"),
                  Slot(p + "eh_proj.weight", q + "eh_proj.weight")]
        slots += _block_slots(p, q + "block.", cfg.n_layers + k < cfg.n_dense_layers, cfg)
        slots += [Slot(p + "shared_head.norm.weight", q + "norm.weight"),
                  Slot(p + "shared_head.head.weight", "head.weight", copy=True)]
    return slots


def fused_expert_names(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """transformers 5's fused expert tensors: hf name -> (our experts prefix, 'gate_up' | 'down')."""
    out = {}
    prefixes = [(f"model.layers.{i}.", f"layers.{i}.") for i in range(cfg.n_dense_layers, cfg.n_layers)]
    prefixes += [(f"model.layers.{cfg.n_layers + k}.", f"mtp.{k}.block.") for k in range(cfg.mtp.depth)]
    for p, q in prefixes:
        out[p + "mlp.experts.gate_up_proj"] = (q + "ffn.experts.", "gate_up")
        out[p + "mlp.experts.down_proj"] = (q + "ffn.experts.", "down")
    return out


def is_fp8_weight(hf_name: str) -> bool:
    """True for exactly the tensors the released FP8 checkpoint quantises (report §3.3.1): every Linear of
    attention, dense FFN, shared and routed experts — in the MTP layer too — and nothing else (not the
    embeddings, norms, gate, e_score_correction_bias, lm_head, eh_proj or shared_head.head)."""
    parts = hf_name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in FP8_MODULES


def rope_row_permutation(hf_name: str, cfg: ModelConfig) -> Optional[torch.Tensor]:
    """Row order that turns a rotate-half (rope_interleave=false) projection into our adjacent-pair
    layout: our rope dims (2i, 2i+1) are its dims (i, i + d/2). None for tensors without rope rows."""
    d, nope = cfg.mla.qk_rope_head_dim, cfg.mla.qk_nope_head_dim
    pair = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=-1).flatten()
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        head = torch.cat([torch.arange(nope), nope + pair])
        return torch.cat([h * (nope + d) + head for h in range(cfg.mla.n_heads)])
    if hf_name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        return torch.cat([torch.arange(cfg.mla.kv_lora_rank), cfg.mla.kv_lora_rank + pair])
    return None


def stored_mtp_layers(names, n_layers: int) -> int:
    """How many MTP layers (layer indices >= num_hidden_layers) the checkpoint stores."""
    idx = {int(m.group(1)) for n in names if (m := LAYER_RE.match(n))}
    return len({i for i in idx if i >= n_layers})
