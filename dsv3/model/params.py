"""Parameter counts of a model config, computed on the meta device (no memory is allocated, so the
671B config counts on a laptop). Activated = what one token touches: every dense weight plus
K_r of the N_r routed experts per MoE layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.model.args import ModelConfig


@dataclass
class ParamCounts:
    total: int                  # main model (MTP excluded), embedding and head included
    activated: int              # per token, embedding and head included
    activated_no_embed: int     # per token, without the input embedding
    mtp: int                    # the MTP modules, sharing embedding and head
    mtp_stored: int             # as stored in the released checkpoint, with their own embedding and head
    kv_values_per_token_layer: int
    kv_bytes_per_token: int     # BF16 cache over all layers


def count_params(cfg: ModelConfig) -> ParamCounts:
    from dsv3.model.transformer import Transformer  # imported lazily: config → params → model
    with torch.device("meta"):
        model = Transformer(cfg)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    main = n(model.embed) + n(model.layers) + n(model.norm) + n(model.head)
    moe_layers = [m for m in model.layers.modules() if type(m).__name__ == "MoE"]
    inactive_per_layer = lambda moe: (moe.cfg.n_routed_experts - moe.cfg.n_activated_experts) * n(moe.experts) // moe.cfg.n_routed_experts  # noqa: E731
    activated = main - sum(inactive_per_layer(m) for m in moe_layers)
    mtp = n(model.mtp)
    embed = n(model.embed)
    kv = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    return ParamCounts(main, activated, activated - embed, mtp,
                       mtp + (embed + n(model.head)) * cfg.mtp.depth, kv, kv * cfg.n_layers * 2)


def _b(x: int) -> str:
    return f"{x / 1e9:.2f}B" if x >= 1e8 else f"{x / 1e6:.2f}M"


def format_counts(c: ParamCounts) -> str:
    return "\n".join([
        f"total params: {_b(c.total)} ({c.total:,})",
        f"activated params: {_b(c.activated)} ({c.activated:,}); without the input embedding: {_b(c.activated_no_embed)}",
        f"mtp params: {_b(c.mtp)} ({c.mtp:,}); as stored with its own embedding and head: {_b(c.mtp_stored)}",
        f"kv cache: {c.kv_values_per_token_layer} values per token per layer, {c.kv_bytes_per_token:,} bytes per token (bf16)",
    ])
