"""One Transformer block: pre-norm MLA then pre-norm FFN (dense SwiGLU or DeepSeekMoE)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsv3.model.args import ModelConfig
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA, MLACache
from dsv3.model.moe import MoE


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg.dim, cfg.mla, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MLP(cfg.dim, cfg.inter_dim) if layer_id < cfg.n_dense_layers else MoE(cfg.dim, cfg.moe)
        self.recompute_norms = False

    def _norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        if self.recompute_norms and torch.is_grad_enabled():
            # report §3.2.3: RMSNorm outputs are recomputed in backward instead of stored
            return torch.utils.checkpoint.checkpoint(norm, x, use_reentrant=False)
        return norm(x)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  cache: Optional[MLACache] = None, start_pos: int = 0) -> torch.Tensor:
        """h = x + MLA(RMSNorm(x)): the first residual half, (B, T, dim)."""
        return x + self.attn(self._norm(self.attn_norm, x), cos, sin, cache, start_pos)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm(h), what the FFN / MoE sees; the block's output is h + ffn(ffn_input(h))."""
        return self._norm(self.ffn_norm, h)

    def ffn_source(self, h: torch.Tensor) -> Optional[tuple]:
        """With the norms recomputed: (ffn_norm, h), from which the MoE gate recomputes its input in the
        backward instead of keeping it (h is kept for the norm's recompute anyway; ffn_norm's output
        dtype does not depend on autocast, so the recompute is bit for bit); else None."""
        if self.recompute_norms and torch.is_grad_enabled() and not self.ffn_norm.autocast_output:
            return self.ffn_norm, h
        return None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[MLACache] = None, start_pos: int = 0) -> torch.Tensor:
        h = self.attention(x, cos, sin, cache, start_pos)
        if isinstance(self.ffn, MoE):
            return h + self.ffn(self.ffn_input(h), self.ffn_source(h))
        return h + self.ffn(self.ffn_input(h))
