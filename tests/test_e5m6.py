"""E5M6 (report §3.3.3): the format against a decoder written here from its definition (all 4,096
codes, the anchors, nearest-even rounding against a table search), the power-of-2 scale against
2^ceil(log2(amax/65,024)), the Triton kernels bit for bit against the torch reference (interpreter on
CPU), round trips, the 1×128 → 128×1 re-tiling, and MLA's gradients with wo's input cached in E5M6
against the same layer with that input cached in BF16."""
from __future__ import annotations

import math

import pytest
import torch

from dsv3.config import FP8Config, MLAConfig
from dsv3.model.mla import MLA
from dsv3.training.precision import apply_fp8
from triton_kernels import e5m6, e5m6_ref
from triton_kernels.gemm_ref import fp8_gemm_ref
from triton_kernels.quant_ref import act_dequant_ref, act_quant_ref, act_quant_t_ref, weight_quant_ref


def decode(code: int) -> float:
    """E5M6 by definition: 1 sign, 5 exponent bits with bias 15, 6 mantissa bits, IEEE-half rules."""
    sign = -1.0 if code >> 11 & 1 else 1.0
    exponent, mantissa = code >> 6 & 0x1F, code & 0x3F
    if exponent == 31:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:
        return sign * mantissa / 64 * 2.0 ** (1 - 15)
    return sign * (1 + mantissa / 64) * 2.0 ** (exponent - 15)


def same(a: float, b: float) -> bool:
    """Equal as numbers, sign of zero included; NaN equals NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def test_all_4096_codes_decode_as_the_definition_in_torch_and_triton():
    codes = torch.arange(4096)
    stored = e5m6_ref.e5m6_from_code(codes)
    assert torch.equal(e5m6_ref.e5m6_code(stored), codes)
    ones = torch.ones(4096 // 128, dtype=torch.float32)
    torch_values = e5m6_ref.e5m6_dequant_ref(stored, ones).tolist()
    triton_values = e5m6.e5m6_dequant(stored, ones).tolist()
    for c in range(4096):
        assert same(torch_values[c], decode(c)), (c, torch_values[c], decode(c))
        assert same(triton_values[c], decode(c)), c
    # every finite code is a fixed point of the rounding (the grid is exactly the decoder's set)
    v = stored.float()
    finite = v.isfinite()
    assert torch.equal(bits(e5m6_ref.e5m6_round(v))[finite], bits(v)[finite])


ANCHORS = [(0.0, 0x000), (-0.0, 0x800), (2.0 ** -20, 0x001), (2.0 ** -14, 0x040), (1.0, 0x3C0),
           (65024.0, 0x7BF), (-65024.0, 0xFBF), (math.inf, 0x7C0), (-math.inf, 0xFC0)]


@pytest.mark.parametrize("value,code", ANCHORS)
def test_anchor_values_encode_to_their_codes(value, code):
    assert same(decode(code), value)
    q = e5m6_ref.e5m6_round(torch.tensor([value])).half()
    assert int(e5m6_ref.e5m6_code(q)) == code


def test_nan_in_nan_out_and_saturation():
    y = torch.tensor([math.nan, 65024 * 1.001, 65280.0, 1e30, -1e30, 3e38])
    r = e5m6_ref.e5m6_round(y)
    assert r[0].isnan()
    assert r[1:].tolist() == [65024.0, 65024.0, 65024.0, -65024.0, 65024.0]
    x = torch.tensor([[1.0, math.nan, -math.inf] + [0.5] * 125])
    for q, s in (e5m6_ref.e5m6_quant_ref(x), e5m6.e5m6_quant(x)):
        d = e5m6_ref.e5m6_dequant_ref(q, s)[0]
        assert d[1].isnan() and d[2] == -math.inf and d[0] == 1.0 and d[3] == 0.5   # the rest stays finite


def nearest_even_by_search(y: torch.Tensor) -> torch.Tensor:
    """Independent rounding: the nearer of the two neighbouring grid values (from decode), ties to the
    even code, magnitudes past 65,024 saturating."""
    grid = torch.tensor([decode(c) for c in range(0x7C0)], dtype=torch.float64)   # +0 … 65,024
    mag = y.double().abs().clamp(max=65024.0)
    hi = torch.searchsorted(grid, mag).clamp(max=len(grid) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return (grid[pick] * torch.where(y < 0, -1.0, 1.0)).float()


def test_rounding_is_nearest_even_against_a_table_search():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-24, 17, (20000,), generator=g).float())
    ties = torch.tensor([1 + 2 ** -7, 1 + 3 * 2 ** -7, 2.0 ** -21, 3 * 2.0 ** -21, 65280.0, -(1 + 2 ** -7)])
    y = torch.cat([y, ties])
    assert torch.equal(e5m6_ref.e5m6_round(y), nearest_even_by_search(y))
    assert e5m6_ref.e5m6_round(ties).tolist() == [1.0, 1 + 2 ** -5, 0.0, 2.0 ** -19, 65024.0, -1.0]


def test_power_of_2_scale_is_the_formula():
    g = torch.Generator().manual_seed(1)
    amax = torch.cat([torch.rand(3000, generator=g) * torch.exp2(torch.randint(-30, 60, (3000,), generator=g).float()),
                      65024.0 * torch.exp2(torch.arange(-20, 20).float()),          # exact powers of the boundary
                      torch.tensor([0.0, 1e-5, 1e-4, 65024.0 * (1 + 2 ** -23), 3e38])])
    got = e5m6_ref.pow2_scale_from_amax(amax).tolist()
    floor = float(torch.tensor(1e-4))                     # quant_ref's amax floor, as fp32
    for a, s in zip(amax.tolist(), got):
        m, e = math.frexp(max(a, floor) / 65024.0)       # exact in fp64: = m · 2^e, m in [0.5, 1)
        assert s == 2.0 ** (e if m > 0.5 else e - 1), (a, s)


ODD = [(70, 300), (1, 5), (129, 128)]


@pytest.mark.parametrize("shape", ODD)
def test_triton_quant_dequant_retile_bit_exact_with_torch(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, (shape[1],), generator=g).float())
    if shape[0] > 8:
        x[3, 2], x[4, 7], x[5, 1], x[7, 3] = math.nan, math.inf, -math.inf, -0.0
        x[6] = 0.0
    q, s = e5m6_ref.e5m6_quant_ref(x)
    q2, s2 = e5m6.e5m6_quant(x)
    assert torch.equal(bits(q), bits(q2)) and torch.equal(s, s2)
    assert torch.equal(bits(e5m6_ref.e5m6_dequant_ref(q, s)), bits(e5m6.e5m6_dequant(q, s)))
    x = x.nan_to_num(0.0, 0.0, 0.0)
    q, s = e5m6_ref.e5m6_quant_ref(x)
    qt, st = e5m6_ref.e5m6_retile_ref(q, s)
    qt2, st2 = e5m6.e5m6_retile(q, s)
    assert qt.shape == (shape[1], shape[0]) and st.shape == (shape[1], -(-shape[0] // 128))
    assert torch.equal(bits(qt), bits(qt2)) and torch.equal(st, st2)


def test_random_round_trip_and_lossless_retiling():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 260, generator=g) * torch.exp2(torch.randint(-8, 8, (300, 1), generator=g).float())
    q, s = e5m6_ref.e5m6_quant_ref(x)
    d = e5m6_ref.e5m6_dequant_ref(q, s)
    scale = s.repeat_interleave(128, dim=1)[:, :260]
    normal = x.abs() >= scale * 2.0 ** -14
    # 6 mantissa bits: half an ulp is 2^-7 of the leading bit; subnormals: half the step 2^-20 · scale
    assert ((d - x).abs() <= 2.0 ** -7 * x.abs())[normal].all()
    assert ((d - x).abs() <= 2.0 ** -21 * scale)[~normal].all()
    assert (s == torch.exp2(torch.log2(s).round())).all()                         # powers of two
    qt, st = e5m6.e5m6_retile(q, s)
    # a power-of-2 re-scaling moves no value off the grid here (no value drops below its new tile's 2^-14)
    assert torch.equal(e5m6_ref.e5m6_dequant_ref(qt, st), d.t())


def test_triton_wgrad_matches_reference():
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(200, 300, generator=g), torch.randn(200, 130, generator=g)
    qt, st = e5m6_ref.e5m6_retile_ref(*e5m6_ref.e5m6_quant_ref(x))
    dy_t, dy_t_s = act_quant_t_ref(dy)
    ref = e5m6_ref.e5m6_wgrad_ref(dy_t, dy_t_s, qt, st)
    got = e5m6.e5m6_wgrad(dy_t, dy_t_s, qt, st)
    # same exact products, FP32 sums in another order: relative error ~ 2^-24 · √(200 terms)
    assert ((got - ref).norm() / ref.norm()).item() < 2.0 ** -18


class _BF16CachedFP8Linear(torch.autograd.Function):
    """The reference layer: FP8 fprop/dgrad as fp8_linear, wo's input cached in BF16 and read as is by wgrad."""

    @staticmethod
    def forward(ctx, x, w):
        w_fp8, w_s = weight_quant_ref(w)
        ctx.save_for_backward(x.to(torch.bfloat16), w_fp8, w_s)
        return fp8_gemm_ref(*act_quant_ref(x), w_fp8, w_s, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x_bf16, w_fp8, w_s = ctx.saved_tensors
        dx = fp8_gemm_ref(*act_quant_ref(dy), w_fp8.t().contiguous(), w_s.t(), out_dtype=dy.dtype)
        dw = act_dequant_ref(*act_quant_t_ref(dy)) @ x_bf16.float()
        return dx, dw


def bf16_cached(x, w):
    return _BF16CachedFP8Linear.apply(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])


def test_mla_gradients_with_e5m6_cache_match_bf16_cache():
    cfg = MLAConfig(n_heads=8, q_lora_rank=None, kv_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
                    v_head_dim=24)                      # wo's input: 192 channels, two 1×128 tiles
    grads = {}
    for cache in ("e5m6", "bf16"):
        torch.manual_seed(5)
        mla = MLA(160, cfg)
        apply_fp8(mla, FP8Config(enabled=True, backend="torch"))
        assert mla.wo.impl.keywords.get("input_cache") == "e5m6"
        if cache == "bf16":
            mla.wo.impl = bf16_cached
        g = torch.Generator().manual_seed(6)
        x = torch.randn(2, 100, 160, generator=g)       # 200 tokens: two 128-token tiles
        cos, sin = torch.ones(100, 4), torch.zeros(100, 4)
        y = mla(x, cos, sin)
        y.backward(torch.randn(y.shape, generator=g))
        grads[cache] = {n: p.grad for n, p in mla.named_parameters()}
    for name, ref in grads["bf16"].items():
        got = grads["e5m6"][name]
        if name == "wo.weight":
            rel = ((got - ref).norm() / ref.norm()).item()
            # E5M6 rounds each cached element by at most 2^-7 of its magnitude; BF16 by 2^-9
            assert rel <= 2.0 ** -7, rel
            assert rel > 2.0 ** -12, rel                 # and E5M6's rounding (rms ~2^-8.5) is in it
        else:   # the forward and dgrad do not read the cache: everything else is identical
            assert torch.equal(got, ref), name
    off = MLA(160, cfg)
    apply_fp8(off, FP8Config(enabled=True, backend="torch", cache_wo_e5m6=False))
    assert "input_cache" not in off.wo.impl.keywords
