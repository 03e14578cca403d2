"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 report §2.1.1).

Per token: c_Q = W_DQ h → RMSNorm → q = W_UQ c_Q, split into q_nope (per head) and q_rope (RoPE);
c_KV = W_DKV h → RMSNorm; k_rope = RoPE(W_KR h), one per token, shared by every head;
k_nope, v = W_UK c_KV, W_UV c_KV. Names follow the official code: wq_a = W_DQ, wq_b = W_UQ,
wkv_a = [W_DKV; W_KR], wkv_b = [W_UK; W_UV], wo = W_O.

Two paths:
- training (``cache=None``): decompress K and V and run causal softmax attention;
- inference (``cache=MLACache``): cache only c_KV and k_rope (kv_lora_rank + qk_rope_head_dim
  values per token per layer), absorb W_UK into the query and W_UV into the output.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dsv3.model import fast
from dsv3.model.args import MLAConfig
from dsv3.model.attention import attention
from dsv3.model.layers import Linear, RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


class MLACache:
    """The compressed cache of one layer: c_KV (B, S, kv_lora_rank) and k_rope (B, S, rope_dim)."""

    def __init__(self, batch: int, max_len: int, cfg: MLAConfig, dtype=torch.float32, device=None):
        self.kv = torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def values_per_token(self) -> int:
        return self.kv.shape[-1] + self.pe.shape[-1]


class MLA(nn.Module):
    def __init__(self, dim: int, cfg: MLAConfig, norm_eps: float = 1e-6):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.wq = Linear(dim, cfg.n_heads * self.qk_head_dim)
        else:
            self.wq_a = Linear(dim, cfg.q_lora_rank)
            self.q_norm = RMSNorm(cfg.q_lora_rank, norm_eps)
            self.q_norm.autocast_output = True     # feeds wq_b only
            self.wq_b = Linear(cfg.q_lora_rank, cfg.n_heads * self.qk_head_dim)
        self.wkv_a = Linear(dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, norm_eps)
        self.kv_norm.autocast_output = True        # feeds wkv_b only (the cached c_KV is written outside autocast)
        self.wkv_b = Linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = Linear(cfg.n_heads * cfg.v_head_dim, dim)
        self.softmax_scale = softmax_scale(cfg)
        self.recompute = False  # report §3.2.3: recompute the up-projections (and the core) in backward
        # hooks (dsv3/model/fast/), defaults chosen by device and dtype, references the formulas:
        # rotate: (x, cos, sin) -> RoPE(x); attention_core: (q_nope, q_rope, k_nope, k_rope, v, scale) -> o;
        # the down-projections, which read the same x, run as one GEMM where that pays (Linear.shared_input)
        self.rotate = fast.auto("rotate", apply_rope)
        self.attention_core = fast.auto("attention_core", attention)
        fast.share_input(self.wq if cfg.q_lora_rank is None else self.wq_a, self.wkv_a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[MLACache] = None, start_pos: int = 0) -> torch.Tensor:
        """x: (B, T, dim); cos/sin: (T, rope_dim/2) for positions start_pos … start_pos+T−1.

        With ``recompute`` on (training), everything from the two down-projections' outputs to the attention
        core's output runs under one checkpoint (report §3.2.3): autograd keeps only c_Q (before q_norm),
        wkv_a's output (c_KV before kv_norm, and the un-rotated k_rope) and the core's output (wo's input);
        backward re-runs the norms, the q / kv up-projections, RoPE and the core forward."""
        q_a = self.wq(x) if self.cfg.q_lora_rank is None else self.wq_a(x)   # q, or c_Q before q_norm
        kv_a = self.wkv_a(x)                                  # [c_KV | k_rope] before kv_norm and RoPE
        if cache is not None:
            q_nope, q_rope, kv, k_rope = self._latents(q_a, kv_a, cos, sin)
            out = self._attend_absorbed(q_nope, q_rope, kv, k_rope.squeeze(2), cache, start_pos)
        elif self.recompute and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self._attend_decompressed, q_a, kv_a, cos, sin,
                                                    use_reentrant=False)
        else:
            out = self._attend_decompressed(q_a, kv_a, cos, sin)
        return self.wo(out.flatten(2))

    def _latents(self, q_a, kv_a, cos, sin):
        """(q_nope, q_rope, c_KV, k_rope) from the down-projections: q = W_UQ RMSNorm(c_Q) (or W_Q x),
        c_KV = RMSNorm(·), RoPE on q_rope and on the shared k_rope (B, T, 1, rope_dim)."""
        B, T, _ = q_a.shape
        c = self.cfg
        q = q_a if c.q_lora_rank is None else self.wq_b(self.q_norm(q_a))
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_head_dim).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_rope = self.rotate(q_rope, cos, sin)
        kv, k_rope = kv_a.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)                                            # c_KV: (B, T, kv_lora_rank)
        k_rope = self.rotate(k_rope.unsqueeze(2), cos, sin)               # (B, T, 1, rope_dim)
        return q_nope, q_rope, kv, k_rope

    def _attend_decompressed(self, q_a, kv_a, cos, sin) -> torch.Tensor:
        """Training path: decompress K and V (W_UK, W_UV) and run causal attention, (B, T, H, d_v)."""
        q_nope, q_rope, kv, k_rope = self._latents(q_a, kv_a, cos, sin)
        B, T, H, _ = q_nope.shape
        k_nope, v = self.wkv_b(kv).view(B, T, H, -1).split([self.cfg.qk_nope_head_dim, self.cfg.v_head_dim], dim=-1)
        return self.attention_core(q_nope, q_rope, k_nope, k_rope, v, self.softmax_scale)

    def _attend_absorbed(self, q_nope, q_rope, kv, k_rope, cache: MLACache, start_pos: int) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        c = self.cfg
        end = start_pos + T
        cache.kv[:B, start_pos:end] = kv.to(cache.kv.dtype)
        cache.pe[:B, start_pos:end] = k_rope.to(cache.pe.dtype)
        w = self.wkv_b.weight.view(H, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)           # W_UK absorbed into q
        ckv, pe = cache.kv[:B, :end], cache.pe[:B, :end]
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, ckv)
                  + torch.einsum("bthr,bsr->bhts", q_rope, pe)) * self.softmax_scale
        causal = torch.ones(T, end, dtype=torch.bool, device=scores.device).tril(start_pos)
        scores = scores.masked_fill(~causal, float("-inf"))
        # softmax in at least FP32 (report §3.3), never below the input precision (fp64 stays fp64)
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q_nope.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", probs, ckv)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)              # W_UV absorbed into the output
