"""The CPU benchmarks' roofline bookkeeping (benchmarks/roofline.py): the GEMM list a step records and its
FLOP, checked against the FLOP counted by hand for a Linear's forward and backward (3 GEMMs of 2·M·N·K),
a grouped GEMM with uneven groups, and the causal attention core (pairs j ≤ i counted one by one); and
the ISA narrowing the AVX2-only emulation relies on. No timing is asserted."""
import importlib.util
import os

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("roofline", os.path.join(ROOT, "benchmarks", "roofline.py"))
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)


def _flop(gemms) -> float:
    return sum(2.0 * m * n * k * c for (m, n, k, _), c in gemms.items())


def test_linear_forward_backward_gemms():
    M, N, K = 24, 40, 16
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    rec = roofline.GemmRecorder()
    with rec:
        F.linear(x, w).sum().backward()
    # y = x Wᵀ (M, N, K); dx = dy W (M, K, N); dW = dyᵀ x (N, K, M)
    f32 = torch.float32
    assert sorted(rec.gemms, key=str) == sorted([(M, N, K, f32), (M, K, N, f32), (N, K, M, f32)], key=str)
    assert _flop(rec.gemms) == 6 * M * N * K


def test_grouped_mm_split_into_groups():
    if not hasattr(torch, "_grouped_mm"):
        return
    sizes, N, K = [5, 0, 11, 8], 16, 32                     # an empty group does no work
    M = sum(sizes)
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(len(sizes), K, N, requires_grad=True)
    rec = roofline.GemmRecorder()
    with rec:
        y = torch._grouped_mm(x, w, offs=offs)
    assert {s for s in rec.gemms} == {(m, N, K, torch.float32) for m in sizes}
    assert _flop(rec.gemms) == 2 * M * N * K
    rec = roofline.GemmRecorder()
    with rec:
        y.backward(torch.randn_like(y))                      # dx and dw: each 2·M·N·K in all
    assert _flop(rec.gemms) == 4 * M * N * K


def test_causal_attention_flop_counted_pair_by_pair():
    B, H, T, d, dv = 2, 3, 7, 8, 8
    q, k, v = (torch.randn(B, H, T, n, requires_grad=True) for n in (d, d, dv))
    rec = roofline.GemmRecorder()
    with rec:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    pairs = sum(1 for i in range(T) for j in range(T) if j <= i)
    fwd = B * H * pairs * (2 * d + 2 * dv)                   # q·k and p·v per visible pair
    assert rec.attn_flop == fwd
    with rec:
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            torch.ones_like(out), q, k, v, out, lse, 0.0, True)
    assert rec.attn_flop == 3 * fwd                           # backward counted as twice the forward


def test_gemm_rate_counts_every_call():
    gemms = roofline.Counter({(8, 16, 4, torch.float32): 3, (4, 8, 8, torch.bfloat16): 1,
                              (0, 5, 5, torch.float32): 2})        # empty shapes add nothing
    flop, secs = roofline.gemm_rate(gemms, repeats=1)
    assert flop == 3 * 2 * 8 * 16 * 4 + 2 * 4 * 8 * 8 and secs > 0


def test_autocast_gemms_recorded_in_their_dtype():
    x = torch.randn(6, 8)
    lin = torch.nn.Linear(8, 4, bias=False)
    rec = roofline.GemmRecorder()
    with rec, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x)
        torch.mm(x, x.t().float())                            # autocast runs this one in BF16 too
    assert set(rec.gemms) == {(6, 4, 8, torch.bfloat16), (6, 6, 8, torch.bfloat16)}


def test_avx2_emulation_drops_wide_isa_flags(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu = roofline.bench_cpu()
    assert not any(f.startswith(("avx512", "amx")) for f in cpu.flags)
    assert cpu.isa in ("avx2", "sse") and not cpu.native_bf16
    assert "emulated: ONEDNN_MAX_CPU_ISA=AVX2" in roofline.isa_label(cpu)
