"""Block-scaled FP8 GEMM (TRITON_INTERPRET=1 on CPU) against FP32/FP64 references, report §3.3.2."""
import importlib.util
import os
import platform

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import

import pytest
import torch

from triton_kernels import gemm_ref as G
from triton_kernels import quant_ref as R

if importlib.util.find_spec("triton") is None:  # declared on Linux (pyproject.toml): missing there fails
    if platform.system() == "Linux":
        pytest.fail("triton is not installed, but pyproject.toml declares it on Linux", pytrace=False)
    pytest.skip(f"triton is not a dependency on {platform.system()}", allow_module_level=True)
from triton_kernels.fp8_gemm import fp8_gemm  # noqa: E402


def _rel_fro(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _operands(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * (1 + 10 * torch.rand(M, 1, generator=g))
    b = torch.randn(N, K, generator=g) * (1 + 10 * torch.rand(1, K, generator=g))
    return a, b


@pytest.mark.parametrize("K", [200, 4096, 16384])
def test_fp8_gemm_equals_fp32_matmul_of_dequantised_operands(K):
    M, N = 67, 45  # neither a multiple of 128; K = 200 is ragged
    a, b = _operands(M, N, K, seed=K)
    a_fp8, a_s = R.act_quant_ref(a)
    b_fp8, b_s = R.weight_quant_ref(b)
    out = fp8_gemm(a_fp8, a_s, b_fp8, b_s, out_dtype=torch.float32)
    ref = R.act_dequant_ref(a_fp8, a_s) @ R.weight_dequant_ref(b_fp8, b_s).t()
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert _rel_fro(out, ref) < 1e-3
    # FP32 accumulation with promotion is in fact far tighter than the bar
    assert _rel_fro(out, ref) < 1e-5


def test_reference_equals_blockwise_promoted_sum_in_fp64():
    """fp8_gemm_ref = Σ_kb a_scale[:, kb] · b_scale[kb] · (a_kb · b_kbᵀ), block products exact in FP64."""
    M, N, K = 33, 140, 300
    a, b = _operands(M, N, K, seed=7)
    a_fp8, a_s = R.act_quant_ref(a)
    b_fp8, b_s = R.weight_quant_ref(b)
    expected = torch.zeros(M, N, dtype=torch.float64)
    for kb in range(3):
        ks = slice(128 * kb, 128 * (kb + 1))
        part = a_fp8[:, ks].double() @ b_fp8[:, ks].double().t()
        b_row_scale = b_s[:, kb].double().repeat_interleave(128)[:N]
        expected += part * a_s[:, kb].double()[:, None] * b_row_scale[None, :]
    out = G.fp8_gemm_ref(a_fp8, a_s, b_fp8, b_s, out_dtype=torch.float32)
    assert _rel_fro(out, expected) < 1e-6


def test_fp8_gemm_is_close_to_the_unquantised_product():
    M, N, K = 67, 45, 1000
    a, b = _operands(M, N, K, seed=11)
    a_fp8, a_s = R.act_quant_ref(a)
    b_fp8, b_s = R.weight_quant_ref(b)
    out = fp8_gemm(a_fp8, a_s, b_fp8, b_s, out_dtype=torch.float32)
    err = _rel_fro(out, a.double() @ b.double().t())
    assert 1e-3 < err < 0.05  # E4M3 noise: present, and bounded by the 3-bit mantissa


def test_per_row_b_scales_wgrad_layout():
    """wgrad multiplies two 1×128-tiled operands: b_scale is (N, KB), one scale per row."""
    M, N, K = 70, 150, 260
    a, b = _operands(M, N, K, seed=12)
    a_fp8, a_s = R.act_quant_ref(a)
    b_fp8, b_s = R.act_quant_ref(b)
    assert G.b_scale_is_per_row(b_fp8, b_s)
    out = fp8_gemm(a_fp8, a_s, b_fp8, b_s, out_dtype=torch.float32)
    ref = R.act_dequant_ref(a_fp8, a_s) @ R.act_dequant_ref(b_fp8, b_s).t()
    assert _rel_fro(out, ref) < 1e-5
    assert _rel_fro(G.fp8_gemm_ref(a_fp8, a_s, b_fp8, b_s, torch.float32), ref) < 1e-6


def test_transposed_weight_view_dgrad_layout_and_bf16_out():
    """dgrad passes wᵀ as a strided view with the transposed block scales; output in bf16."""
    M, N, K = 33, 300, 130  # dx (M, K) = dy (M, N) · w (N, K)
    dy, _ = _operands(M, 1, N, seed=13)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(14))
    dy_fp8, dy_s = R.act_quant_ref(dy)
    w_fp8, w_s = R.weight_quant_ref(w)
    out = fp8_gemm(dy_fp8, dy_s, w_fp8.t(), w_s.t(), out_dtype=torch.bfloat16)
    ref = R.act_dequant_ref(dy_fp8, dy_s) @ R.weight_dequant_ref(w_fp8, w_s)
    assert out.dtype == torch.bfloat16 and out.shape == (M, K)
    # one bf16 rounding of the output (the interpreter truncates: up to one ulp)
    assert ((out.float() - ref).abs() <= 2.0 ** -7 * ref.abs() + 1e-6).all()
    ref_out = G.fp8_gemm_ref(dy_fp8, dy_s, w_fp8.t(), w_s.t(), out_dtype=torch.float32)
    assert _rel_fro(ref_out, ref) < 1e-6


def test_rejects_mismatched_k():
    a_fp8, a_s = R.act_quant_ref(torch.randn(4, 256))
    b_fp8, b_s = R.weight_quant_ref(torch.randn(8, 200))
    with pytest.raises(AssertionError, match="K mismatch"):
        fp8_gemm(a_fp8, a_s, b_fp8, b_s)
