"""MLA: the absorbed, cached decode path against the training path; the compressed cache size; an fp64
gradcheck; RoPE against a complex-multiplication reference and YaRN against transformers; the attention itself
(training and cached decode, YaRN with mscale ≠ mscale_all_dim) against transformers' DeepseekV3Attention."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_cfg
from dsv3.config import MLAConfig, RopeScaling
from dsv3.model.mla import MLA, MLACache
from dsv3.model.transformer import Transformer
from dsv3.model.rope import apply_rope, inv_frequencies, rope_cos_sin, softmax_scale

YARN = RopeScaling(factor=40.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                   mscale=0.707, mscale_all_dim=0.707)
VARIANTS = {
    "q_lora": MLAConfig(n_heads=3, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5),
    "no_q_lora": MLAConfig(n_heads=3, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5),
    "yarn": MLAConfig(n_heads=3, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5,
                      rope_scaling=YARN),
}
MAX_ABS = {torch.float32: 1e-5, torch.float64: 1e-12}


def make_mla(cfg: MLAConfig, dim=24, dtype=torch.float32, seed=0) -> MLA:
    g = torch.Generator().manual_seed(seed)
    mla = MLA(dim, cfg)
    with torch.no_grad():
        for name, p in mla.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return mla.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_plus_16_decode_steps_equal_training_path(variant, dtype):
    cfg = VARIANTS[variant]
    mla = make_mla(cfg, dtype=dtype)
    B, prefill, steps = 2, 7, 16
    T = prefill + steps
    cos, sin = rope_cos_sin(cfg, 64, dtype=dtype)
    x = torch.randn(B, T, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = mla(x, cos[:T], sin[:T])                                   # training path (decompressed K, V)
        cache = MLACache(B, T, cfg, dtype=dtype)
        outs = [mla(x[:, :prefill], cos[:prefill], sin[:prefill], cache, 0)]
        for t in range(prefill, T):
            outs.append(mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache, t))
    cached = torch.cat(outs, dim=1)
    assert (cached - full).abs().max().item() <= MAX_ABS[dtype]
    # the cache holds exactly c_KV and the shared k_rope, and they equal the projections of x
    assert cache.values_per_token() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv, pe = mla.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    torch.testing.assert_close(cache.kv, mla.kv_norm(kv).detach())
    torch.testing.assert_close(cache.pe, apply_rope(pe.unsqueeze(2), cos[:T], sin[:T]).squeeze(2).detach())


def test_model_cache_is_576_like_and_decode_matches_full_forward():
    """Whole model in fp64: 16 cached decode steps give the full forward's logits; the caches hold
    kv_lora_rank + qk_rope_head_dim values per token per layer and nothing else."""
    cfg = tiny_cfg().model
    model = Transformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 20)
        steps = [model(ids[:, :4], caches=caches, start_pos=0)]
        for t in range(4, 20):
            steps.append(model(ids[:, t:t + 1], caches=caches, start_pos=t))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-12
    per_token_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    total = sum(c.kv.numel() + c.pe.numel() for c in caches)
    assert total == 2 * 20 * cfg.n_layers * per_token_layer


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn"])
def test_gradcheck_fp64(variant):
    cfg = VARIANTS[variant]
    mla = make_mla(MLAConfig(**{**cfg.__dict__, "n_heads": 2, "kv_lora_rank": 6, "qk_nope_head_dim": 4,
                                "qk_rope_head_dim": 4, "v_head_dim": 3,
                                "q_lora_rank": cfg.q_lora_rank and 5}), dim=8, dtype=torch.float64)
    cos, sin = rope_cos_sin(mla.cfg, 5, dtype=torch.float64)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [p for p in mla.parameters()]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(mla, dict(zip([n for n, _ in mla.named_parameters()], ps))):
            return mla(x, cos, sin)
    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_(True) for p in params]), eps=1e-6, atol=1e-7)


def test_rope_equals_complex_multiplication():
    """Adjacent pairs (x[2i], x[2i+1]) as one complex number times e^{i·pos·θ_i}, as the official code does."""
    cfg = MLAConfig(qk_rope_head_dim=16)
    T = 50
    x = torch.randn(2, T, 3, 16, dtype=torch.float64)
    cos, sin = rope_cos_sin(cfg, T, dtype=torch.float64)
    freqs, _ = inv_frequencies(16, cfg.rope_theta, None)
    freqs_cis = torch.polar(torch.ones(T, 8, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs.float().double()))
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs_cis[None, :, None]).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, rtol=1e-12, atol=1e-12)
    # not the rotate-half layout: that would pair x[i] with x[i + d/2]
    half = torch.cat([x[..., :8] * cos[:, None] - x[..., 8:] * sin[:, None], x[..., 8:] * cos[:, None] + x[..., :8] * sin[:, None]], -1)
    assert (apply_rope(x, cos, sin) - half).abs().max() > 0.1


def test_yarn_frequencies_and_scales_equal_transformers():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    import transformers.utils.logging as hf_logging
    hf_logging.set_verbosity_error()
    cfg = MLAConfig(n_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
                    rope_scaling=RopeScaling(mscale=0.707, mscale_all_dim=0.707))
    s = cfg.rope_scaling
    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, qk_rope_head_dim=16,
                          qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16, q_lora_rank=None,
                          max_position_embeddings=4096 * 40, rope_interleave=True,
                          rope_scaling=dict(type="yarn", factor=s.factor, original_max_position_embeddings=4096,
                                            beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale,
                                            mscale_all_dim=s.mscale_all_dim))
    rot = DeepseekV3RotaryEmbedding(hf)
    freqs, attn_factor = inv_frequencies(16, cfg.rope_theta, s)
    torch.testing.assert_close(freqs.float(), rot.inv_freq, rtol=1e-6, atol=0)
    assert attn_factor == pytest.approx(rot.attention_scaling, rel=1e-12)
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-12)
    # 671B long-context: softmax scale × (0.1·ln40 + 1)² (report §4.3, YaRN)
    v3 = MLAConfig(qk_nope_head_dim=128, qk_rope_head_dim=64, rope_scaling=RopeScaling())
    assert softmax_scale(v3) == pytest.approx(192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    pos = torch.arange(3000)
    hf_cos, hf_sin = rot(torch.zeros(1, 1, dtype=torch.float32), pos[None])
    cos, sin = rope_cos_sin(cfg, 3000)
    # transformers multiplies fp32 positions by its fp32 frequencies (angle rounded: ≤ u·pos·f) and takes cos
    # and sin in fp32; we use the fp32-rounded frequencies in fp64 angles. cos and sin are 1-Lipschitz, so
    # |Δ| ≤ attn·pos·(|Δf| + u·f) + 4u (cos/sin in fp32 ≤ 1 ulp, the scaling and our cast ½ ulp each); the
    # angle rounding alone reaches 0.94 of it at some positions: the bound is tight, and the same on any CPU
    u, f_hf = 2.0 ** -24, rot.inv_freq.double()
    bound = attn_factor * pos[:, None].double() * ((freqs.float().double() - f_hf).abs() + u * f_hf) + 4 * u
    for ours, theirs in ((cos, hf_cos), (sin, hf_sin)):
        assert ((ours.double() - theirs[0, :, :8].double()).abs() <= bound).all()


def test_flash_mla_core_equals_sdpa_path():
    """dsv3.model.attention: the direct flash-kernel Function (CPU, FP32) equals F.scaled_dot_product_attention
    on the concatenated heads — outputs and the gradients of all five pieces, the shared rope key's
    gradient summed over heads — for FP32 and BF16 inputs."""
    import dsv3.model.fast.attention_core as A
    if not A._HAS_CPU_FLASH:
        pytest.fail("this torch has no CPU flash-attention kernels (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)")
    B, T, H, dn, dr, dv = 2, 37, 3, 16, 8, 12
    g = torch.Generator().manual_seed(0)
    for dtype, tol, u in ((torch.float32, 1e-5, 2.0 ** -24), (torch.bfloat16, 1e-2, 2.0 ** -8)):
        shapes = [(B, T, H, dn), (B, T, H, dr), (B, T, H, dn), (B, T, 1, dr), (B, T, H, dv)]
        base = [torch.randn(*s, generator=g).to(dtype) for s in shapes]
        dy = torch.randn(B, T, H, dv, generator=g).to(dtype)
        outs = []
        for flash in (True, False):
            xs = [t.clone().requires_grad_(True) for t in base]
            if flash:
                y = A._FlashMLA.apply(*xs, 0.3)
            else:
                q = torch.cat(xs[:2], -1).transpose(1, 2)
                k_rope_heads = xs[3].expand(B, T, H, dr)
                k_rope_heads.retain_grad()
                k = torch.cat([xs[2], k_rope_heads], -1).transpose(1, 2)
                y = A.causal_attention(q, k, xs[4].transpose(1, 2), 0.3).transpose(1, 2)
            y.backward(dy)
            outs.append([y] + [x.grad for x in xs])
        for i, (a, b) in enumerate(zip(*outs)):
            assert a.dtype == b.dtype == dtype
            if i == 4:
                # the shared rope key's gradient: the same FP32 per-head values, summed over heads in FP32 and
                # rounded once (flash) or rounded per head and summed in `dtype` (expand's backward), so
                # |Δ| ≤ u·((H + 1)·Σ_h|g_h| + 2|g|), u = 2⁻⁸ in BF16 (the sum cancels: no fixed tolerance fits)
                g_heads = k_rope_heads.grad.float().abs().sum(2, keepdim=True)
                bound = u * ((H + 1) * g_heads + 2 * b.float().abs())
                assert ((a.float() - b.float()).abs() <= bound).all(), ((a.float() - b.float()).abs() / bound).max()
            else:   # the same FP32 kernel on both sides (bitwise equal here), then one rounding to `dtype`
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_rope_function_equals_pairwise_formula():
    """apply_rope (complex multiplication with a hand-written backward) equals the pairwise rotation
    x0·cos − x1·sin, x0·sin + x1·cos and its autograd, in fp64, on a strided slice as MLA passes it."""
    from dsv3.model.fast.rope import rotate_pairs as apply_rope
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    base = torch.randn(2, 5, 3, 12, generator=g, dtype=torch.float64)
    x1 = base[..., 4:].clone().requires_grad_(True)
    x2 = base[..., 4:].clone().requires_grad_(True)
    dy = torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)
    apply_rope(x1, cos, sin).backward(dy)
    p = x2.unflatten(-1, (-1, 2))
    c, s = cos[:, None, :], sin[:, None, :]
    ref = torch.stack((p[..., 0] * c - p[..., 1] * s, p[..., 0] * s + p[..., 1] * c), dim=-1).flatten(-2)
    ref.backward(dy)
    torch.testing.assert_close(apply_rope(x1, cos, sin), ref, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-14, atol=1e-14)
    assert apply_rope(base[..., 4:].float(), cos.float(), sin.float()).dtype == torch.float32


# mscale ≠ mscale_all_dim: cos/sin carry mscale(40, 1.0)/mscale(40, 0.5) ≠ 1 and the softmax scale mscale(40, 0.5)²
YARN_UNEQUAL = RopeScaling(factor=40.0, original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                           mscale=1.0, mscale_all_dim=0.5)


def _hf_attention_pair():
    """transformers' DeepseekV3Attention (rope_interleave: the released adjacent-pair layout) and our MLA with
    the same weights, copied by the released tensor names (q_a_proj = wq_a, …) written out here."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    import transformers.utils.logging as hf_logging
    hf_logging.set_verbosity_error()
    s = YARN_UNEQUAL
    cfg = MLAConfig(n_heads=3, q_lora_rank=20, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5,
                    rope_scaling=s)
    hf_cfg = DeepseekV3Config(hidden_size=24, num_attention_heads=3, num_key_value_heads=3, q_lora_rank=20,
                              kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5,
                              max_position_embeddings=640, rope_interleave=True,
                              rope_parameters=dict(rope_type="yarn", factor=s.factor, rope_theta=cfg.rope_theta,
                                                   original_max_position_embeddings=s.original_max_position_embeddings,
                                                   beta_fast=s.beta_fast, beta_slow=s.beta_slow, mscale=s.mscale,
                                                   mscale_all_dim=s.mscale_all_dim))
    hf_cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(hf_cfg, 0).eval()
    ours = make_mla(cfg, dim=24)
    names = {"q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
             "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for theirs, our in names.items():
            getattr(hf, theirs).weight.copy_(mine[our + ".weight"])
    return hf, DeepseekV3RotaryEmbedding(hf_cfg), ours, cfg


def test_mla_equals_transformers_attention_with_yarn_training_and_decode():
    """Training path (decompressed K, V) and prefill + 16 cached absorbed decode steps against transformers'
    DeepseekV3Attention with its own YaRN tables and softmax scale (mscale ≠ mscale_all_dim), in fp32: the
    repo's fp32 bound for this attention (MAX_ABS, outputs of size ~1), and the input gradient likewise. A
    softmax scale without mscale_all_dim², or cos/sin without the mscale ratio, moves the output by > 100×."""
    hf, rot, ours, cfg = _hf_attention_pair()
    B, prefill, steps = 2, 7, 16
    T = prefill + steps
    x = torch.randn(B, T, 24, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(B, T, 24, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(T)[None]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    xh, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = hf(xh, rot(xh, pos), mask)[0]
    (want * dy).sum().backward()
    cos, sin = rope_cos_sin(cfg, 64)
    got = ours(xo, cos[:T], sin[:T])
    (got * dy).sum().backward()
    tol = MAX_ABS[torch.float32]
    assert (got - want).abs().max().item() <= tol
    assert (xo.grad - xh.grad).abs().max().item() <= tol
    with torch.no_grad():
        cache = MLACache(B, T, cfg)
        outs = [ours(x[:, :prefill], cos[:prefill], sin[:prefill], cache, 0)]
        outs += [ours(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache, t) for t in range(prefill, T)]
        assert (torch.cat(outs, 1) - want).abs().max().item() <= tol
        # sensitivity: the two YaRN factors this test pins
        plain = make_mla(MLAConfig(**{**cfg.__dict__, "rope_scaling": None}), dim=24)
        plain.load_state_dict(ours.state_dict())
        plain.softmax_scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
        assert (plain(x, cos[:T], sin[:T]) - want).abs().max().item() > 100 * tol
        unscaled = torch.cat([cos[:T], sin[:T]], -1) / cos[0, 0]     # cos(0) = the cos/sin factor
        assert abs(cos[0, 0].item() - 1.0) > 0.05
        assert (ours(x, *unscaled.split(cfg.qk_rope_head_dim // 2, -1)) - want).abs().max().item() > 100 * tol


def test_blocked_causal_core_equals_sdpa_path():
    """dsv3.model.attention: the query-blocked causal Function (CPU, FP32, short sequences) equals
    F.scaled_dot_product_attention on the concatenated heads in fp64 — outputs and the gradients of all
    five pieces — at a length that leaves a partial last block. The FP32 result differs from the fp64 one
    by rounding only: |Δ| ≤ 64·u·(1 + |ref|) with u = 2⁻²⁴ covers the ≤ T-term dot products' accumulated
    rounding (√T·u·Σ|terms| with terms O(1)) and the softmax's."""
    import dsv3.model.fast.attention_core as A
    B, T, H, dn, dr, dv = 2, A.BLOCK * 2 + 21, 3, 16, 8, 12
    g = torch.Generator().manual_seed(1)
    shapes = [(B, T, H, dn), (B, T, H, dr), (B, T, H, dn), (B, T, 1, dr), (B, T, H, dv)]
    base = [torch.randn(*s, generator=g) for s in shapes]
    dy = torch.randn(B, T, H, dv, generator=g)
    outs = []
    for blocked in (True, False):
        xs = [(t if blocked else t.double()).clone().requires_grad_(True) for t in base]
        if blocked:
            y = A._BlockedCausalMLA.apply(*xs, 0.3)
        else:
            q = torch.cat(xs[:2], -1).transpose(1, 2)
            k = torch.cat([xs[2], xs[3].expand(B, T, H, dr)], -1).transpose(1, 2)
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, xs[4].transpose(1, 2), is_causal=True, scale=0.3).transpose(1, 2)
        y.backward(dy.to(y.dtype))
        outs.append([y] + [x.grad for x in xs])
    u = 2.0 ** -24
    for a, b in zip(*outs):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        bound = 64 * u * (1 + b.abs()) * (H if a.shape[2] == 1 else 1)   # the rope key sums H heads
        assert ((a.double() - b).abs() <= bound).all(), ((a.double() - b).abs() / bound).max()


@pytest.mark.parametrize("T", [40, 300])                   # the blocked core (T ≤ 256) and the flash core
@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora"])
def test_recompute_keeps_only_the_latents_and_gives_the_same_gradients(variant, T):
    """recompute on (report §3.2.3): the output and every gradient equal recompute off bit for bit, and
    autograd keeps exactly x, c_Q (or q), wkv_a's output and wo's input — the distinct storages it saves,
    counted by saved_tensors_hooks, against that sum of shapes (the up-projected q, k, v are not kept)."""
    cfg = VARIANTS[variant]
    B, dim = 2, 24
    cos, sin = rope_cos_sin(cfg, 512)
    x = torch.randn(B, T, dim, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(B, T, dim, generator=torch.Generator().manual_seed(4))
    grads, saved = {}, {}
    for on in (False, True):
        mla = make_mla(cfg)
        mla.recompute = on
        xx = x.clone().requires_grad_()
        seen = {}
        keep = {t.untyped_storage().data_ptr() for t in (*mla.parameters(), cos, sin)}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in keep:
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mla(xx, cos[:T], sin[:T])
        y.backward(dy)
        grads[on] = [y.detach(), xx.grad] + [p.grad for p in mla.parameters()]
        saved[on] = sum(seen.values()) / (B * T * 4)            # FP32 values per token
    for a, b in zip(grads[False], grads[True]):
        assert torch.equal(a, b)
    q_in = cfg.q_lora_rank or cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert saved[True] == dim + q_in + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.n_heads * cfg.v_head_dim
    assert saved[False] > saved[True] + cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
