"""FP8 quantisation kernels (TRITON_INTERPRET=1 on CPU) against their torch references, report §3.3.1."""
import importlib.util
import os
import platform

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import pytest
import torch

from triton_kernels import quant_ref as R

if importlib.util.find_spec("triton") is None:  # declared on Linux (pyproject.toml): missing there fails
    if platform.system() == "Linux":
        pytest.fail("triton is not installed, but pyproject.toml declares it on Linux", pytrace=False)
    pytest.skip(f"triton is not a dependency on {platform.system()}", allow_module_level=True)
from triton_kernels import quant as Q  # noqa: E402

E4M3_HALF_ULP = 2.0 ** -4  # relative half-ulp of a 3-bit mantissa
E4M3_SUBNORMAL_STEP = 2.0 ** -9


def _same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _mixed_magnitudes(*shape, seed=0):
    """Normal values times per-element magnitudes over 8 decades (exercises E4M3 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 10.0 ** (torch.rand(*shape, generator=g) * 8 - 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2_scale", [False, True])
def test_act_quant_kernel_matches_reference_bitwise(dtype, pow2_scale):
    x = _mixed_magnitudes(2, 37, 300).to(dtype)  # K = 300: two full tiles and a ragged one
    x_fp8, s = Q.act_quant(x, pow2_scale=pow2_scale)
    x_fp8_ref, s_ref = R.act_quant_ref(x, pow2_scale=pow2_scale)
    assert x_fp8.shape == x.shape and x_fp8.dtype == torch.float8_e4m3fn
    assert s.shape == (2, 37, 3) and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert _same_fp8(x_fp8, x_fp8_ref)


def test_act_quant_scale_convention():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    _, s = R.act_quant_ref(x)
    amax = x.abs().unflatten(-1, (2, 128)).amax(-1)
    torch.testing.assert_close(s, amax / 448.0, rtol=0, atol=0)
    x[0, :128] = 0.0  # an all-zero tile gets the floor scale and zeros, not NaN
    x_fp8, s = Q.act_quant(x)
    assert s[0, 0].item() == pytest.approx(1e-4 / 448.0)
    assert torch.all(x_fp8[0, :128].float() == 0)


@pytest.mark.parametrize("pow2_scale", [False, True])
def test_quant_dequant_error_within_e4m3_rounding(pow2_scale):
    x = _mixed_magnitudes(64, 384, seed=2)
    x_fp8, s = R.act_quant_ref(x, pow2_scale=pow2_scale)
    x_back = R.act_dequant_ref(x_fp8, s)
    s_full = s.repeat_interleave(128, -1)
    # nearest rounding: half an ulp relative for normals, half the subnormal step (× scale) below
    bound = E4M3_HALF_ULP * x.abs() + 0.5 * E4M3_SUBNORMAL_STEP * s_full
    err = (x_back - x).abs()
    assert (err <= bound * (1 + 1e-6)).all(), f"worst err/bound {(err / bound).max().item():.3f}"
    assert (err / bound).max() > 0.5  # the bound is tight: rounding does reach it


def test_pow2_scales_never_overflow():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 512, generator=g) * 10.0 ** (torch.randint(-6, 7, (48, 1), generator=g).float())
    # amax exactly 448·2^k (scale 2^k exact) and the next float above it (scale must go up)
    x[:2, :128] = torch.rand(2, 128, generator=g)  # below the special values set next
    x[0, 0] = 448.0 * 2.0 ** 3
    x[1, 0] = torch.nextafter(torch.tensor(448.0 * 2.0 ** -5), torch.tensor(1e9)).item()
    x[2, :128] = 1e-30  # below the amax floor
    for quant in (R.act_quant_ref, Q.act_quant):
        x_fp8, s = quant(x, pow2_scale=True)
        mantissa, _ = torch.frexp(s)
        assert torch.all(mantissa == 0.5), "scales must be powers of two"
        amax = x.abs().unflatten(-1, (4, 128)).amax(-1).clamp(min=1e-4)
        assert torch.all(amax / s <= 448.0), "a value would overflow E4M3"
        assert torch.all(amax / s > 224.0), "the exponent must be the smallest that fits"
        assert not torch.isnan(x_fp8.float()).any()
    assert s[0, 0].item() == 8.0 and s[1, 0].item() == 2.0 ** -4


@pytest.mark.parametrize("shape", [(200, 300), (3, 130, 257)])
def test_weight_quant_and_dequant_kernels_match_reference(shape):
    w = _mixed_magnitudes(*shape, seed=4)
    w_fp8, s = Q.weight_quant(w)
    w_fp8_ref, s_ref = R.weight_quant_ref(w)
    nb, kb = -(-shape[-2] // 128), -(-shape[-1] // 128)
    assert s.shape == (*shape[:-2], nb, kb)
    assert torch.equal(s, s_ref) and _same_fp8(w_fp8, w_fp8_ref)
    # checkpoint convention: weight_scale_inv = amax(block)/448 over the zero-padded block
    last_block = w[..., 128 * (nb - 1):, 128 * (kb - 1):]
    torch.testing.assert_close(s_ref[..., -1, -1], last_block.abs().amax((-2, -1)) / 448, rtol=0, atol=0)
    w_back = Q.weight_dequant(w_fp8, s, dtype=torch.float32)
    assert torch.equal(w_back, R.weight_dequant_ref(w_fp8, s))
    s_full = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :shape[-2], :shape[-1]]
    bound = E4M3_HALF_ULP * w.abs() + 0.5 * E4M3_SUBNORMAL_STEP * s_full
    assert ((w_back - w).abs() <= bound * (1 + 1e-6)).all()
    bf16 = Q.weight_dequant(w_fp8, s, dtype=torch.bfloat16)
    # within one bf16 ulp: the CPU interpreter's fp32→bf16 cast truncates where a GPU rounds
    assert bf16.dtype == torch.bfloat16
    assert ((bf16.float() - w_back).abs() <= 2.0 ** -7 * w_back.abs()).all()


def test_token_tiles_never_straddle_experts():
    offsets = torch.tensor([0, 3, 3, 260, 261, 400], dtype=torch.int32)  # empty first and third groups
    M = 410  # rows past offsets[-1] belong to no expert
    start, end, group, group_tile = R.token_tiles(offsets, M)
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    covered = torch.zeros(M, dtype=torch.int64)
    for t in range(start.numel()):
        s, e, g = int(start[t]), int(end[t]), int(group[t])
        if s == e:
            continue
        assert starts[g] <= s < e <= ends[g] and e - s <= 128
        assert int(group_tile[g]) <= t < int(group_tile[g + 1])
        covered[s:e] += 1
    assert torch.equal(covered, (torch.arange(M) < 400).long())
    assert group_tile.tolist() == [0, 0, 1, 1, 4, 5, 7]  # 3 rows, 257 rows, 1 row, 139 rows


@pytest.mark.parametrize("with_offsets", [False, True])
def test_transposed_quant_kernel_matches_reference(with_offsets):
    x = _mixed_magnitudes(330, 150, seed=5)
    offsets = torch.tensor([3, 3, 200, 201, 330], dtype=torch.int32) if with_offsets else None
    if with_offsets:  # rows past offsets[-1] belong to no expert: zero in both, not mixed into a tile
        short = torch.tensor([3, 3, 200, 201, 300], dtype=torch.int32)
        x_t, s = Q.act_quant_t(x, short)
        x_t_ref, s_ref = R.act_quant_t_ref(x, short)
        assert torch.equal(s, s_ref) and _same_fp8(x_t, x_t_ref)
        assert torch.all(x_t[:, 300:].float() == 0)
    x_t, s = Q.act_quant_t(x, offsets)
    x_t_ref, s_ref = R.act_quant_t_ref(x, offsets)
    assert x_t.shape == (150, 330) and s.shape == s_ref.shape
    assert s.shape[1] == (6 + 1 if with_offsets else 3)  # used tiles plus the static bound's spare
    assert torch.equal(s, s_ref) and _same_fp8(x_t, x_t_ref)
    # one scale per (channel, 128-token tile): amax over exactly those tokens
    first_tile = 3 if with_offsets else 128
    assert s_ref[7, 0].item() == pytest.approx(max(x[:first_tile, 7].abs().max().item(), 1e-4) / 448, rel=1e-6)
    back = R.act_dequant_t_ref(x_t, s, offsets)
    bound = E4M3_HALF_ULP * x.t().abs() + 0.5 * E4M3_SUBNORMAL_STEP * back.abs().max()
    assert ((back - x.t()).abs() <= bound).all()


def _mantissa_bits(s: torch.Tensor) -> torch.Tensor:
    return s.contiguous().view(torch.int32) & 0x7FFFFF


def test_constants_are_the_reports_literals():
    """Report §3.3: E4M3's largest finite value 448, tiles of 1×128 (activations) and 128×128 (weights), and
    the official kernels' amax floor 1e-4 — written here as literals, checked on both the reference and the
    kernels by what they compute, so a wrong constant shared by both cannot hide."""
    assert (R.FP8_MAX, R.AMAX_FLOOR, R.BLOCK) == (448.0, 1e-4, 128)
    assert torch.finfo(torch.float8_e4m3fn).max == 448.0
    x = torch.zeros(3, 300)
    x[0, 127], x[0, 128] = 5.0, -7.0            # last element of tile 0, first of tile 1
    x[1, 299] = 448.0 * 3                      # the ragged third tile
    floor = torch.tensor(1e-4, dtype=torch.float32) / torch.tensor(448.0)
    for quant in (R.act_quant_ref, Q.act_quant):
        x_fp8, s = quant(x)
        assert s.shape == (3, 3)
        assert s[0, 0].item() == (torch.tensor(5.0) / 448.0).item()
        assert s[0, 1].item() == (torch.tensor(7.0) / 448.0).item()
        assert s[1, 2].item() == 3.0 and x_fp8[1, 299].float().item() == 448.0
        assert s[2, 0].item() == floor.item() and s[0, 2].item() == floor.item()
        assert x_fp8[0, 127].float().item() == 448.0 and x_fp8[0, 128].float().item() == -448.0
    w = torch.zeros(300, 260)
    w[127, 127], w[128, 0], w[299, 259] = 2.0, 448.0, -448.0 * 4
    for quant in (R.weight_quant_ref, Q.weight_quant):
        w_fp8, s = quant(w)
        assert s.shape == (3, 3)
        assert s[0, 0].item() == (torch.tensor(2.0) / 448.0).item() and s[1, 0].item() == 1.0
        assert s[2, 2].item() == 4.0 and s[0, 1].item() == floor.item()
        assert w_fp8[128, 0].float().item() == 448.0


def test_pow2_scales_bit_by_bit_in_dispatch_and_kernels():
    """Power-of-2 scales (report §3.3.3, the MoE dispatch's activations): every fp32 scale has a zero
    mantissa field — checked on the bits, for the reference, the kernel, the transposed-tile kernel and the
    expert dispatch's quantiser — and the exponent is the smallest with amax/scale ≤ 448."""
    from parallel.all_to_all import quant_pow2
    x = _mixed_magnitudes(40, 384, seed=4)
    amax = x.abs().unflatten(-1, (3, 128)).amax(-1).clamp(min=1e-4)
    for name, quant in (("ref", R.act_quant_ref), ("kernel", Q.act_quant), ("dispatch", quant_pow2)):
        _, s = quant(x, pow2_scale=True) if name != "dispatch" else quant(x)
        assert (_mantissa_bits(s) == 0).all(), name
        assert ((amax / s <= 448.0) & (amax / s > 224.0)).all(), name
    _, s_t = Q.act_quant_t(x, pow2_scale=True)
    assert (_mantissa_bits(s_t) == 0).all()
    assert (_mantissa_bits(Q.act_quant(x)[1]) != 0).any()     # without the flag they are not
