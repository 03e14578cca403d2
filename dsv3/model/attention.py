"""MLA's causal attention core on decompressed heads, the plain formula (report §2.1.1, eq. 1–11):
o = softmax(q kᵀ · scale + causal mask) v per head, computed in at least FP32 whatever the autocast (report
§3.3: the core keeps its original precision) and returned in q's dtype.

It takes the pieces as MLA produces them, (B, T, H, ·) with the rope key shared by every head
(B, T, 1, d_rope), and returns (B, T, H, d_v). It is the reference of the ``MLA.attention_core`` hook,
whose default runs the same maths faster (dsv3/model/fast/attention_core.py: query-blocked or flash
kernels on CPU, fused SDPA kernels elsewhere).
"""
from __future__ import annotations

import torch


def attention(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
              v: torch.Tensor, scale: float) -> torch.Tensor:
    B, T, H, _ = q_nope.shape
    dtype = torch.promote_types(q_nope.dtype, torch.float32)
    with torch.autocast(q_nope.device.type, enabled=False):
        q = torch.cat([q_nope, q_rope], dim=-1).to(dtype)                         # (B, T, H, d_qk)
        k = torch.cat([k_nope, k_rope.expand(B, T, H, -1)], dim=-1).to(dtype)
        scores = torch.einsum("bthd,bshd->bhts", q, k) * scale                    # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        out = torch.einsum("bhts,bshd->bthd", probs, v.to(dtype))                 # (B, T, H, d_v)
    return out.to(q_nope.dtype)
