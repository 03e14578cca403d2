"""Multi-Token Prediction (report §2.2, Figure 3).

Module k (k = 1…D) at position i combines the previous depth's representation h_i^{k−1} with the
embedding of token t_{i+k}:  h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k−1})]  — concatenated in
the released weights' order (``enorm`` first, then ``hnorm``, projected by ``eh_proj``) — then one
Transformer block, a final norm (``shared_head.norm``) and the output head shared with the main model.
Loss (eq. 24–25): L_k = −(1/T) Σ_i log P_k[t_{i+1+k}] over valid positions, L_MTP = λ/D Σ_k L_k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.block import Block
from dsv3.model.args import ModelConfig
from dsv3.model.layers import Linear, RMSNorm


class MTPModule(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, fp8_exempt=True)  # kept BF16 in the released weights
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm.autocast_output = True            # feeds the shared head only

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h_prev: h^{k−1} (B, T, dim); emb_next: Emb(t_{i+k}) (B, T, dim). Returns h^k (B, T, dim)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin)


def shifted(ids: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """ids shifted left by k along time; the last k positions get `fill` (they carry no target)."""
    out = torch.full_like(ids, fill)
    if k < ids.shape[1]:
        out[:, : ids.shape[1] - k] = ids[:, k:]
    return out


def mtp_depth_loss(logits: torch.Tensor, labels: torch.Tensor, k: int, ignore_index: int = -100) -> torch.Tensor:
    """L_k for depth k: labels (B, T) are the main model's next-token targets (t_{i+1}); depth k at
    position i predicts t_{i+1+k} = labels[i+k]. Sum of CE over valid positions divided by B·T."""
    B, T, V = logits.shape
    target = shifted(labels, k, ignore_index)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(B * T, V), target.reshape(B * T),
                         ignore_index=ignore_index, reduction="sum")
    return ce / (B * T)
