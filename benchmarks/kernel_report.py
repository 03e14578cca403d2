"""Compiled-kernel report: every Triton kernel × every tile configuration its launcher can pick ×
{sm_90a, sm_100a}: registers, stack / spill bytes, shared memory, tensor-core opcode — no GPU needed.

The launches are the ones FP8 training makes (``triton_kernels.aot.training_launches``: fp8_linear and
fp8_grouped_mm forward and backward at M = 512 and M = 64, which take ``gemm_blocks``' two tiles, the
E5M6 cache and the dequantisers), bound as a real launch binds them and compiled ahead of time
(``triton_kernels.aot``). Baseline: a plain Triton FP8 matmul (``_fp8_matmul_kernel`` below: one
``tl.dot`` accumulating in place, no block scales, no promotion) at each GEMM tile the launchers pick,
so the cost of DeepSeek-V3's per-128 promotion (report §3.3.2) shows as the difference.

Reading the columns: ``stack`` is the per-thread stack frame (local memory); ``spill`` the bytes ptxas
stored / loaded to free registers (0/0 = none); ``smem`` the dynamic shared memory a launch asks for —
for a pipelined K loop about num_stages × (BLOCK_M + BLOCK_N) × BLOCK_K bytes of FP8 tiles; ``tmem``
Blackwell tensor-memory columns (the accumulator); ``global reads`` the PTX's cp.async copies into
shared memory (what the pipeline overlaps with the MMAs) and its loads into registers, by width.
Run (several minutes on 2 cores):
    python benchmarks/kernel_report.py [--targets sm_90a sm_100a] [--jobs 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from triton_kernels import aot  # noqa: E402
from triton_kernels._triton_compat import tl, triton  # noqa: E402

BASELINE = "_fp8_matmul_kernel"


@triton.jit
def _fp8_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                       stride_cm, stride_cn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # c = a · bᵀ with the operands laid out as _fp8_gemm_kernel's, FP32 accumulation inside tl.dot
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def fp8_matmul(a_fp8, b_fp8, block_m: int, block_n: int, num_warps: int, num_stages: int = 3):
    """The baseline's launcher: a (M, K), b (N, K) E4M3 -> a · bᵀ (M, N) BF16 at the given tile."""
    import torch
    from triton_kernels.quant_ref import BLOCK, cdiv
    M, K = a_fp8.shape
    N = b_fp8.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=a_fp8.device)
    _fp8_matmul_kernel[(cdiv(M, block_m), cdiv(N, block_n))](
        a_fp8, b_fp8, out, M, N, K, a_fp8.stride(0), a_fp8.stride(1), b_fp8.stride(0), b_fp8.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
        num_warps=num_warps, num_stages=num_stages)
    return out


def report_launches() -> None:
    """Training's launches, then the baseline at each of gemm_blocks' tiles (M = 512 and M = 64)."""
    import torch
    from triton_kernels.fp8_gemm import gemm_blocks
    aot.training_launches()
    for m in (512, 64):
        a = torch.zeros(m, 256, dtype=torch.float8_e4m3fn)
        b = torch.zeros(384, 256, dtype=torch.float8_e4m3fn)
        fp8_matmul(a, b, *gemm_blocks(m))


def _short(dtype: str) -> str:
    return {"fp8e4nv": "e4m3", "fp16": "f16", "bf16": "bf16", "fp32": "f32", "i32": "i32"}.get(dtype, dtype)


def table(facts: list[dict]) -> str:
    """One markdown row per (kernel, configuration, target); baseline rows marked."""
    head = ("| kernel | tile / switches | warps·stages | pointer dtypes | used by | target | regs | stack B "
            "| spill st/ld B | smem B | tmem cols | global reads (PTX, ×count) | tensor-core op (×count in SASS) |")
    rows = [head, "|" + "---|" * 13]
    order = {k: i for i, k in enumerate(dict.fromkeys(f["kernel"] for f in facts))}

    def key(f):
        target = list(aot.TARGETS).index(f["target"])
        return order[f["kernel"]], json.dumps(f["config"]), json.dumps(f["pointers"]), target
    for f in sorted(facts, key=key):
        tile = ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in f["config"].items())
        dtypes = [_short(v) for k, v in f["pointers"].items() if not k.startswith(("tile_", "group_"))]
        # the autograd op that launched it, or the launcher itself where a probe called it directly
        sites = sorted({f"`{callee if caller.endswith('_launches') else caller}`"
                        for callee, caller in (s.split("<") for s in f["sites"])})
        mma = ", ".join(f"{op} ×{n}" for op, n in f["mma"].items()) or "—"
        reads = ", ".join(f"{op} ×{n}" for op, n in sorted(f["global_loads"].items(), key=lambda x: -x[1]))
        name = f"`{f['kernel']}` (baseline)" if f["kernel"] == BASELINE else f"`{f['kernel']}`"
        rows.append(f"| {name} | {tile} | {f['num_warps']}·{f['num_stages']} | {'/'.join(dtypes)} | "
                    f"{'; '.join(sites)} | {f['target']} | {f['registers']} | {f['stack_bytes']} | "
                    f"{f['spill_store_bytes']}/{f['spill_load_bytes']} | {f['shared_bytes']} | "
                    f"{f['tmem_cols']} | {reads} | {mma} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(aot.TARGETS), choices=list(aot.TARGETS))
    parser.add_argument("--jobs", type=int, default=2, help="compiling worker processes (default 2)")
    parser.add_argument("--json", help="also write the raw facts here")
    args = parser.parse_args(argv)
    facts = aot.compile_facts(tuple(args.targets), probes=f"{os.path.abspath(__file__)}:report_launches",
                              jobs=args.jobs, timeout=3600)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(facts, f, indent=1)
    print(table(facts["facts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
