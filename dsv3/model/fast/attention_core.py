"""MLA's causal attention core on decompressed heads, fast: the implementations behind ``MLA.attention_core``
(dsv3.model.mla), chosen by ``dsv3.model.fast.default_impls``: ``cpu_attention`` on CPU in FP32 (whatever
the autocast: report §3.3, the core keeps its original precision), ``sdpa_attention`` elsewhere — on CUDA
in the autocast dtype through the fused SDPA kernels. The reference they are tested against is the plain
softmax(q kᵀ · scale + causal mask) v of ``dsv3.model.attention.attention``.

They take the pieces as MLA produces them, (B, T, H, ·) with the rope key shared over heads (B, T, 1, d_rope),
and return (B, T, H, d_v). MLA's query/key head (192 at 671B) is wider than its value head (128), which keeps
torch's fused CPU flash kernel from running; V is zero-padded to the key width (the extra output columns are
exactly zero and dropped). On CPU in FP32 ``_FlashMLA`` assembles q, k and the padded v once in the kernel's
(B, T, H, d) layout and calls the flash forward and backward kernels directly, so the concatenations, the
broadcast of the rope key, the padding and the dtype casts cost no autograd nodes; elsewhere the same maths
goes through F.scaled_dot_product_attention. tests/test_mla.py checks both against each other.

For short sequences on CPU in FP32 (T ≤ ``BLOCKED_MAX_T``) ``_BlockedCausalMLA`` runs instead: the causal
softmax in query blocks of ``BLOCK`` rows as batched GEMMs over (B·H), each block against only the keys
at or before it (the masked upper triangle is never computed), V unpadded, the probabilities kept for
the backward (B·H·T²/2 values). With AVX2-only kernels at T = 128 and 256 its forward + backward took
1.2–1.6× less time than the flash kernels' in isolation (3–6% of a whole FP32 step; with AVX-512 the two
are even: benchmarks/README.md, "CPU speed on an AVX2-only CPU"); for longer sequences the flash kernels
keep memory linear in T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten
_HAS_CPU_FLASH = hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
    _aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


class _FlashMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale: float):
        B, T, H, dn = q_nope.shape
        d, dv = dn + q_rope.shape[-1], v.shape[-1]
        q = torch.empty(B, T, H, d, dtype=torch.float32, device=q_nope.device)
        q[..., :dn], q[..., dn:] = q_nope, q_rope
        k = torch.empty_like(q)
        k[..., :dn], k[..., dn:] = k_nope, k_rope
        vp = torch.empty_like(q)
        vp[..., :dv], vp[..., dv:] = v, 0.0
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), vp.transpose(1, 2), 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, vp, out, lse)
        ctx.meta = (scale, dn, dv, [t.dtype for t in (q_nope, q_rope, k_nope, k_rope, v)])
        return out.transpose(1, 2)[..., :dv].to(q_nope.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, vp, out, lse = ctx.saved_tensors
        scale, dn, dv, dtypes = ctx.meta
        g = torch.empty_like(q)
        g[..., :dv], g[..., dv:] = grad, 0.0
        dq, dk, dvp = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), vp.transpose(1, 2), out, lse, 0.0, True,
            scale=scale)
        dq, dk, dvp = dq.transpose(1, 2), dk.transpose(1, 2), dvp.transpose(1, 2)
        grads = (dq[..., :dn], dq[..., dn:], dk[..., :dn], dk[..., dn:].sum(2, keepdim=True), dvp[..., :dv])
        return (*(t.to(dt) for t, dt in zip(grads, dtypes)), None)


BLOCK = 64
BLOCKED_MAX_T = 256


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, d) → (B·H, T, d) contiguous FP32."""
    B, T, H, d = x.shape
    return x.transpose(1, 2).reshape(B * H, T, d).to(torch.float32).contiguous()


class _BlockedCausalMLA(torch.autograd.Function):
    """Causal softmax attention on MLA's pieces by query blocks: for rows s:e, S = q_s k_{:e}ᵀ · scale with
    the diagonal block masked, P = softmax(S) in FP32, o_s = P v_{:e}. Backward per block (the softmax
    backward dS = P ⊙ (dP − rowsum(dO ⊙ O))): dV_{:e} += Pᵀ dO_s, dQ_s = dS k_{:e} · scale,
    dK_{:e} += dSᵀ q_s · scale; the shared rope key's gradient is summed over heads."""

    @staticmethod
    def forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale: float):
        with torch.autocast(q_nope.device.type, enabled=False):    # the core stays FP32 (report §3.3)
            return _BlockedCausalMLA._forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale)

    @staticmethod
    def _forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale: float):
        B, T, H, dn = q_nope.shape
        q = _heads(torch.cat([q_nope, q_rope], dim=-1))
        k = _heads(torch.cat([k_nope, k_rope.expand(B, T, H, -1)], dim=-1))
        vh = _heads(v)
        out = q.new_empty(B * H, T, vh.shape[-1])
        probs = []
        for s in range(0, T, BLOCK):
            e = min(s + BLOCK, T)
            scores = torch.bmm(q[:, s:e], k[:, :e].transpose(1, 2)).mul_(scale)
            upper = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).triu_(1)
            scores[:, :, s:].masked_fill_(upper, float("-inf"))
            p = torch.softmax(scores, dim=-1)
            torch.bmm(p, vh[:, :e], out=out[:, s:e])
            probs.append(p)
        ctx.save_for_backward(q, k, vh, out, *probs)
        ctx.meta = (scale, B, H, dn, [t.dtype for t in (q_nope, q_rope, k_nope, k_rope, v)])
        return out.view(B, H, T, -1).transpose(1, 2).to(q_nope.dtype)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _BlockedCausalMLA._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        q, k, vh, out, *probs = ctx.saved_tensors
        scale, B, H, dn, dtypes = ctx.meta
        T = q.shape[1]
        dout = _heads(grad)
        delta = (dout * out).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(vh)
        for p, s in zip(probs, range(0, T, BLOCK)):
            e = min(s + BLOCK, T)
            dv[:, :e].baddbmm_(p.transpose(1, 2), dout[:, s:e])
            ds = torch.bmm(dout[:, s:e], vh[:, :e].transpose(1, 2)).sub_(delta[:, s:e]).mul_(p).mul_(scale)
            torch.bmm(ds, k[:, :e], out=dq[:, s:e])
            dk[:, :e].baddbmm_(ds.transpose(1, 2), q[:, s:e])
        dq, dk, dv = (t.view(B, H, T, -1).transpose(1, 2) for t in (dq, dk, dv))
        grads = (dq[..., :dn], dq[..., dn:], dk[..., :dn], dk[..., dn:].sum(2, keepdim=True), dv)
        return (*(t.to(dt) for t, dt in zip(grads, dtypes)), None)


def cpu_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
                  v: torch.Tensor, scale: float) -> torch.Tensor:
    """The core on CPU computed in FP32: query-blocked up to ``BLOCKED_MAX_T`` positions, then torch's
    flash kernels (SDPA where this torch has none)."""
    if q_nope.shape[1] <= BLOCKED_MAX_T:
        return _BlockedCausalMLA.apply(q_nope, q_rope, k_nope, k_rope, v, scale)
    if _HAS_CPU_FLASH:
        return _FlashMLA.apply(q_nope, q_rope, k_nope, k_rope, v, scale)
    return sdpa_attention(q_nope, q_rope, k_nope, k_rope, v, scale)


def sdpa_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor,
                   v: torch.Tensor, scale: float) -> torch.Tensor:
    """The core through F.scaled_dot_product_attention on the concatenated heads (``causal_attention``)."""
    B, T, H, _ = q_nope.shape
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)                   # (B, H, T, d_qk)
    k = torch.cat([k_nope, k_rope.expand(B, T, H, -1)], dim=-1).transpose(1, 2)
    return causal_attention(q, k, v.transpose(1, 2), scale).transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention on (B, H, T, d) through F.scaled_dot_product_attention, returned in q's
    dtype. On CPU in ≥ FP32; on CUDA in the autocast dtype (BF16: the report keeps the core at its original
    precision, and the flash / cuDNN / efficient kernels run BF16 — they accumulate softmax in FP32). V is
    padded to the query width where the fused kernels want equal head dims (CPU flash, CUDA)."""
    cuda = q.device.type == "cuda"
    dtype, out_dtype = (q.dtype if cuda else torch.promote_types(q.dtype, torch.float32)), q.dtype
    d_v = v.shape[-1]
    pad = d_v < q.shape[-1] and (cuda or dtype == torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if pad:
            v = F.pad(v, (0, q.shape[-1] - d_v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return (out[..., :d_v] if pad else out).to(out_dtype)
