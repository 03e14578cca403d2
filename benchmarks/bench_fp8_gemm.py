"""TFLOPS of our block-scaled FP8 GEMMs beside BF16 torch.matmul, torch._scaled_mm and Transformer Engine.

Claims checked (DeepSeek-V3 report §3.3; DeepGEMM's published H800 figures): FP8 with 1×128 / 128×128
scaling and FP32 promotion beats BF16 (target ≥ 1.3× at M = 4096) and approaches DeepGEMM (1.0–1.5 PFLOPS dense on
H800 at large shapes). Shapes: DeepSeek-V3's (N, K) with M ∈ {64, 128, 4096}; grouped: DeepGEMM's
contiguous-layout table. Columns: TFLOPS per implementation; "err" = relative Frobenius error of
our output against the BF16 matmul; "×bf16" = our speed-up over BF16; "%DG" = our TFLOPS as a
share of DeepGEMM's published number for that shape (H800 and H100 SXM have the same FP8
tensor-core peak; an H200 too, with faster HBM). Our times are GEMM-only, operands already
quantised, as DeepGEMM's; TE's include its own quantisation of the input.
``_scaled_mm`` runs DeepSeek's blockwise scales (1×128 activations, 128×128 weights, cuBLAS ≥ 12.9)
where this torch/cuBLAS accepts them for the shape ("block"), else one scale per row ("row"); a mode
is used only if its output is within 10% of the BF16 product (E4M3 noise is ~4%).
Needs a CUDA GPU; on CPU it says so and exits 0 (``--smoke`` runs the table on one tiny shape on
CPU through the interpreter, to check the script itself; its timings mean nothing).
Run: python benchmarks/bench_fp8_gemm.py
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DENSE_M = [64, 128, 4096]
# Published by DeepSeek: github.com/deepseek-ai/DeepGEMM, README.md of the first release (Feb 2025),
# "Performance" section: "all shapes potentially used in DeepSeek-V3/R1 inference ... on H800 SXM5 with
# NVCC 12.8", column "Computation".
# Table "Normal GEMMs for dense models": (M, N, K) -> TFLOPS
DEEPGEMM_DENSE = {
    (64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 32768, 512): 219, (64, 7168, 16384): 336,
    (64, 4096, 7168): 287, (64, 7168, 2048): 295, (128, 2112, 7168): 352, (128, 24576, 1536): 535,
    (128, 32768, 512): 358, (128, 7168, 16384): 645, (128, 4096, 7168): 533, (128, 7168, 2048): 510,
    (4096, 2112, 7168): 1058, (4096, 24576, 1536): 990, (4096, 32768, 512): 590,
    (4096, 7168, 16384): 1358, (4096, 4096, 7168): 1304, (4096, 7168, 2048): 1025,
}
# Same README, table "Grouped GEMMs for MoE models (contiguous layout)": (groups, M/group, N, K) -> TFLOPS
DEEPGEMM_GROUPED = {(4, 8192, 4096, 7168): 1297, (4, 8192, 7168, 2048): 1099,
                    (8, 4096, 4096, 7168): 1288, (8, 4096, 7168, 2048): 1093}


def bench_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def scaled_mm_fn(a_fp8, a_s, w_fp8, w_s, row_a, row_a_s, row_w, row_w_s, ref):
    """torch._scaled_mm with DeepSeek's blockwise scales if this torch/cuBLAS has them, else rowwise.

    Each candidate is run once and kept only if its output is within 10% of ``ref`` (a mode that
    read the scales in another layout would be far off)."""
    attempts = [  # cuBLAS wants the 1×128 scales M-major (stride (1, M)) and the 128×128 ones as (KB, NB)
        ("block", lambda: torch._scaled_mm(a_fp8, w_fp8.t(), scale_a=a_s.t().contiguous().t(),
                                           scale_b=w_s.t(), out_dtype=torch.bfloat16)),
    ]
    F = torch.nn.functional
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):  # torch ≥ 2.10: recipes named explicitly
        attempts.append(("block", lambda: F.scaled_mm(
            a_fp8, w_fp8.t(), a_s.t().contiguous().t(), F.ScalingType.BlockWise1x128, w_s.t(),
            F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)))
    attempts.append(("row", lambda: torch._scaled_mm(row_a, row_w.t(), scale_a=row_a_s.contiguous(),
                                                     scale_b=row_w_s.t().contiguous(), out_dtype=torch.bfloat16)))
    for mode, fn in attempts:
        try:
            if rel_err(fn(), ref) < 0.1:
                return mode, fn
        except (RuntimeError, NotImplementedError, ValueError, TypeError, AttributeError):
            continue
    return "n/a", None


def te_status() -> str:
    """One line on Transformer Engine: its version and recipe, or why there is no TE column."""
    try:
        import transformer_engine
        from transformer_engine.common import recipe
    except Exception as e:  # noqa: BLE001 - optional package: any import failure means no TE column
        return f"Transformer Engine: missing ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); no TE column"
    if not hasattr(recipe, "Float8BlockScaling"):
        return (f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}: no Float8BlockScaling recipe "
                "in this build; no TE column")
    return (f"Transformer Engine {getattr(transformer_engine, '__version__', '?')}: column TE = te.Linear under "
            "Float8BlockScaling (its own quantisation of the input inside the timed call)")


def te_fn(a_bf16: torch.Tensor, N: int, K: int):
    """Transformer Engine Linear under FP8 autocast with DeepSeek-style block scaling (Float8BlockScaling)."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
        rec = recipe.Float8BlockScaling()
        layer = te.Linear(K, N, bias=False, params_dtype=torch.bfloat16, device="cuda")
    except Exception:  # noqa: BLE001 - missing or unusable TE: te_status() says why, the column says n/a
        return "n/a", None

    def run():
        with torch.no_grad(), te.fp8_autocast(enabled=True, fp8_recipe=rec):
            return layer(a_bf16)
    try:
        run()
    except Exception:  # noqa: BLE001 - a TE build without this recipe/shape: report n/a, keep going
        return "n/a", None
    return "block", run


def dense_row(M: int, N: int, K: int, device: str, ops) -> tuple[str, float]:
    """One line of the dense table and our speed-up over BF16."""
    from triton_kernels.quant_ref import act_quant_ref
    flop = 2 * M * N * K
    tflops = lambda t_ms: flop / t_ms / 1e9  # noqa: E731
    a = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * K ** -0.5
    a_fp8, a_s = ops.act_quant(a)
    w_fp8, w_s = ops.weight_quant(w)
    ref = torch.matmul(a, w.t())
    t_bf16 = bench_ms(lambda: torch.matmul(a, w.t()), device)
    t_ours = bench_ms(lambda: ops.gemm(a_fp8, a_s, w_fp8, w_s, out_dtype=torch.bfloat16), device)
    err = rel_err(ops.gemm(a_fp8, a_s, w_fp8, w_s, out_dtype=torch.bfloat16), ref)
    row_a, row_a_s = act_quant_ref(a, block=K)  # one scale per row: _scaled_mm's rowwise mode
    row_w, row_w_s = act_quant_ref(w, block=K)
    mode, sm = scaled_mm_fn(a_fp8, a_s, w_fp8, w_s, row_a, row_a_s, row_w, row_w_s, ref)
    sm_col = f"{tflops(bench_ms(sm, device)):7.0f} {mode:>4}" if sm else f"{'n/a':>12}"
    te_mode, te_run = te_fn(a, N, K) if device == "cuda" else ("n/a", None)
    te_col = f"{tflops(bench_ms(te_run, device)):7.0f} {te_mode:>6}" if te_run else f"{'n/a':>14}"
    dg = DEEPGEMM_DENSE.get((M, N, K))
    dg_col = f"{100 * tflops(t_ours) / dg:4.0f}%" if dg else "  n/a"
    speedup = t_bf16 / t_ours
    return (f"{M:>5} {N:>6} {K:>6} | {tflops(t_bf16):7.0f} {tflops(t_ours):7.0f} {sm_col} {te_col} | "
            f"{err:8.2e} {speedup:5.2f}× {dg_col}"), speedup


def dense_table(ms: list[int], nks: list[tuple[int, int]], device: str, backend: str) -> None:
    from triton_kernels.backend import fp8_ops
    ops = fp8_ops(backend)
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'bf16':>7} {'ours':>7} {'_scaled_mm':>12} {'TE':>14} | "
          f"{'err':>8} {'×bf16':>6} {'%DG':>5}", flush=True)
    speedups_4096 = []
    for M in ms:
        for N, K in nks:
            try:
                line, speedup = dense_row(M, N, K, device, ops)
            except Exception as e:  # noqa: BLE001 - one broken shape must not hide the others
                line, speedup = f"{M:>5} {N:>6} {K:>6} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]}", None
            if M == 4096 and speedup is not None:
                speedups_4096.append(speedup)
            print(line, flush=True)
    if speedups_4096:
        gm = torch.tensor(speedups_4096).log().mean().exp().item()
        print(f"geometric-mean speed-up over BF16 at M = 4096: {gm:.2f}× over {len(speedups_4096)} shapes "
              f"(target ≥ 1.3×)", flush=True)


def grouped_row(G: int, m: int, N: int, K: int, device: str, ops) -> str:
    flop = 2 * G * m * N * K
    tflops = lambda t_ms: flop / t_ms / 1e9  # noqa: E731
    x = torch.randn(G * m, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(G, N, K, device=device, dtype=torch.bfloat16) * K ** -0.5
    offsets = torch.arange(1, G + 1, device=device, dtype=torch.int32) * m
    if hasattr(torch, "_grouped_mm") and device == "cuda":
        bf16 = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)  # noqa: E731
    else:
        bf16 = lambda: torch.cat([x[g * m:(g + 1) * m] @ w[g].t() for g in range(G)])  # noqa: E731
    x_fp8, x_s = ops.act_quant(x)
    w_fp8, w_s = ops.weight_quant(w)
    ours = lambda: ops.grouped_gemm(x_fp8, x_s, w_fp8, w_s, offsets, out_dtype=torch.bfloat16)  # noqa: E731
    t_bf16, t_ours = bench_ms(bf16, device), bench_ms(ours, device)
    dg = DEEPGEMM_GROUPED.get((G, m, N, K))
    dg_col = f"{100 * tflops(t_ours) / dg:4.0f}%" if dg else "  n/a"
    return (f"{G:>6} {m:>6} {N:>5} {K:>5} | {tflops(t_bf16):7.0f} {tflops(t_ours):7.0f} | "
            f"{rel_err(ours(), bf16()):8.2e} {t_bf16 / t_ours:5.2f}× {dg_col}")


def grouped_table(shapes: list[tuple[int, int, int, int]], device: str, backend: str) -> None:
    from triton_kernels.backend import fp8_ops
    ops = fp8_ops(backend)
    print(f"\n{'groups':>6} {'M/grp':>6} {'N':>5} {'K':>5} | {'bf16':>7} {'ours':>7} | "
          f"{'err':>8} {'×bf16':>6} {'%DG':>5}", flush=True)
    for G, m, N, K in shapes:
        try:
            line = grouped_row(G, m, N, K, device, ops)
        except Exception as e:  # noqa: BLE001 - one broken shape must not hide the others
            line = f"{G:>6} {m:>6} {N:>5} {K:>5} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
        print(line, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU self-check of the script on tiny shapes")
    args = p.parse_args()
    if args.smoke:
        print(te_status())
        dense_table([67], [(200, 300)], "cpu", "triton")
        grouped_table([(3, 70, 130, 200)], "cpu", "triton")
        return
    if not torch.cuda.is_available():
        print("bench_fp8_gemm.py needs a CUDA GPU (Hopper for FP8 tensor cores); none found, nothing measured.")
        sys.exit(0)
    import triton
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"Triton {triton.__version__}; TFLOPS = 2·M·N·K / time (triton.testing.do_bench)")
    print(te_status())
    print("%DG: DeepGEMM's published H800 TFLOPS for the shape (github.com/deepseek-ai/DeepGEMM README, Feb 2025)\n",
          flush=True)
    dense_table(DENSE_M, DENSE_NK, "cuda", "triton")
    grouped_table(list(DEEPGEMM_GROUPED), "cuda", "triton")


if __name__ == "__main__":
    main()
