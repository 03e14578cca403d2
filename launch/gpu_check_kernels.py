"""Part 1 of the GPU check: every Triton kernel in triton_kernels/ against its torch reference.

Standards are the CPU tests' own: the quantisers (FP8 E4M3, E5M6) bit for bit with their references
(tests/test_fp8_quant.py, tests/test_e5m6.py), the GEMMs within the relative-Frobenius bounds of
tests/test_fp8_gemm.py, test_fp8_grouped_gemm.py, test_fp8_linear.py and test_e5m6.py — for the FP8
GEMMs on a GPU the tests' stated bar of 1e-3 rather than the interpreter's exact-FP32 1e-5 (GEMM_BOUND). Inputs are
made on the CPU from fixed seeds; a quantiser's reference runs on the CPU (what the suite verified),
a GEMM's reference is the FP64 product of the reference-dequantised operands, on the kernel's device.
Odd shapes as in the tests; on a GPU also DeepSeek-V3-sized ones (``small=False``).

Every ``@triton.jit`` function whose name ends in ``_kernel`` is found by a scan of the package's
sources; a kernel no check covers is listed and fails the part.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parent.parent / "triton_kernels"
_JIT_KERNEL = re.compile(r"^@triton\.jit(?:\(.*\))?\s*\n(?:@.*\n)*def\s+(\w+_kernel)\b", re.M)
# relative Frobenius error of a GEMM against the FP64 product of its dequantised operands. On the CPU
# (interpreter: exact FP32 sums) the tests' 1e-5; on a GPU the tests' stated bar, 1e-3
# (tests/test_fp8_gemm.py): Hopper's FP8 tensor cores keep ~14 bits while they accumulate one 128-long
# interval (report §3.3.2), which the promotion into FP32 bounds but does not remove.
GEMM_BOUND = {"cpu": 1e-5, "cuda": 1e-3}
E5M6_WGRAD_BOUND = 2.0 ** -18   # tests/test_e5m6.py: same exact products, FP32 sums in another order
CHECKS: list = []          # (kernels covered, check function)


def kernels_in_sources(kernel_dir: Path = KERNEL_DIR) -> dict[str, str]:
    """{kernel name: file} for every @triton.jit def named *_kernel in triton_kernels/*.py."""
    return {name: path.name for path in sorted(kernel_dir.glob("*.py"))
            for name in _JIT_KERNEL.findall(path.read_text())}


def check(*kernels: str):
    def register(fn):
        CHECKS.append((kernels, fn))
        return fn
    return register


def mixed(*shape, seed: int) -> torch.Tensor:
    """Normal values times magnitudes over 8 decades (E4M3 subnormals included), as test_fp8_quant."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 10.0 ** (torch.rand(*shape, generator=g) * 8 - 4)


def bit_diff(got: torch.Tensor, ref: torch.Tensor) -> tuple[int, int]:
    """(elements whose bits differ, largest difference of the integer bit patterns: ulps for floats)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, ref.shape, got.dtype, ref.dtype)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[ref.element_size()]
    a = got.detach().cpu().contiguous().view(ints).long()
    b = ref.detach().cpu().contiguous().view(ints).long()
    diff = (a - b).abs()
    return int((diff != 0).sum()), int(diff.max()) if diff.numel() else 0


def exact_row(what: str, pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple:
    parts, ok = [], True
    for name, got, ref in pairs:
        n, ulps = bit_diff(got, ref)
        ok &= n == 0
        parts.append(f"{name} {n}/{ref.numel()} differ" + (f" (max {ulps} ulp)" if n else ""))
    return what, "; ".join(parts), "0 differ (bit-exact)", ok


def rel_fro(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double().to(x.device)
    return ((x - ref).norm() / ref.norm()).item()


def gemm_row(what: str, got: torch.Tensor, ref: torch.Tensor, bound: float) -> tuple:
    err = rel_fro(got, ref)
    return what, f"rel. Frobenius err {err:.2e}", f"< {bound:.1e}", err < bound


# ------------------------------------------------------------------------------------ E4M3 quantisers
@check("_act_quant_kernel")
def act_quant(dev, small):
    from triton_kernels import quant, quant_ref
    rows = []
    for shape in [(2, 37, 300)] + ([] if small else [(4096, 7168)]):
        for dtype in (torch.float32, torch.bfloat16):
            for pow2 in (False, True):
                x = mixed(*shape, seed=len(rows)).to(dtype)
                got, ref = quant.act_quant(x.to(dev), pow2_scale=pow2), quant_ref.act_quant_ref(x, pow2_scale=pow2)
                rows.append(exact_row(f"act_quant {tuple(shape)} {str(dtype)[6:]} pow2={pow2}",
                                      [("fp8", got[0], ref[0]), ("scales", got[1], ref[1])]))
    return rows


@check("_weight_quant_kernel")
def weight_quant(dev, small):
    from triton_kernels import quant, quant_ref
    rows = []
    for i, shape in enumerate([(200, 300), (3, 130, 257)] + ([] if small else [(7168, 2048)])):
        w = mixed(*shape, seed=10 + i)
        got, ref = quant.weight_quant(w.to(dev)), quant_ref.weight_quant_ref(w)
        rows.append(exact_row(f"weight_quant {shape}", [("fp8", got[0], ref[0]), ("scales", got[1], ref[1])]))
    return rows


@check("_weight_dequant_kernel")
def weight_dequant(dev, small):
    from triton_kernels import quant, quant_ref
    w_fp8, s = quant_ref.weight_quant_ref(mixed(3, 130, 257, seed=20))
    ref = quant_ref.weight_dequant_ref(w_fp8, s)
    rows = [exact_row("weight_dequant fp32 (3, 130, 257)",
                      [("values", quant.weight_dequant(w_fp8.to(dev), s.to(dev), dtype=torch.float32), ref)])]
    got = quant.weight_dequant(w_fp8.to(dev), s.to(dev), dtype=torch.bfloat16).float().cpu()
    # tests/test_fp8_quant.py: within one bf16 ulp (the interpreter truncates; a GPU rounds)
    worst = ((got - ref).abs() / (2.0 ** -7 * ref.abs()).clamp(min=1e-30)).max().item()
    rows.append(("weight_dequant bf16 (3, 130, 257)", f"worst abs err / (2^-7·abs ref) = {worst:.3f}", "<= 1",
                 worst <= 1.0))
    return rows


@check("_act_quant_t_kernel")
def act_quant_t(dev, small):
    from triton_kernels import quant, quant_ref
    rows = []
    x = mixed(330, 150, seed=30)
    for offsets in (None, torch.tensor([3, 3, 200, 201, 330], dtype=torch.int32),
                    torch.tensor([3, 3, 200, 201, 300], dtype=torch.int32)):
        got = quant.act_quant_t(x.to(dev), None if offsets is None else offsets.to(dev))
        ref = quant_ref.act_quant_t_ref(x, offsets)
        label = "no groups" if offsets is None else f"offsets {offsets.tolist()}"
        rows.append(exact_row(f"act_quant_t (330, 150) {label}", [("fp8", got[0], ref[0]), ("scales", got[1], ref[1])]))
    if not small:
        x = mixed(4096, 2048, seed=31).to(torch.bfloat16)
        got, ref = quant.act_quant_t(x.to(dev)), quant_ref.act_quant_t_ref(x)
        rows.append(exact_row("act_quant_t (4096, 2048) bf16", [("fp8", got[0], ref[0]), ("scales", got[1], ref[1])]))
    return rows


# ------------------------------------------------------------------------------------------ E4M3 GEMMs
def _operands(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g) * (1 + 10 * torch.rand(M, 1, generator=g))
    b = torch.randn(N, K, generator=g) * (1 + 10 * torch.rand(1, K, generator=g))
    return a, b


@check("_fp8_gemm_kernel")
def fp8_gemm(dev, small):
    from triton_kernels import fp8_gemm as G
    from triton_kernels import quant_ref as R
    rows = []
    shapes = [(67, 45, 200)] + ([] if small else [(67, 45, 4096), (67, 45, 16384), (64, 2112, 7168), (4096, 2112, 7168)])
    for M, N, K in shapes:
        a, b = _operands(M, N, K, seed=K + M)
        (a8, a_s), (b8, b_s) = R.act_quant_ref(a), R.weight_quant_ref(b)
        out = G.fp8_gemm(a8.to(dev), a_s.to(dev), b8.to(dev), b_s.to(dev), out_dtype=torch.float32)
        a_d, b_d = R.act_dequant_ref(a8.to(dev), a_s.to(dev)), R.weight_dequant_ref(b8.to(dev), b_s.to(dev))
        rows.append(gemm_row(f"fp8_gemm fprop {M}×{N}×{K}", out, a_d.double() @ b_d.double().t(), GEMM_BOUND[dev]))
    a, b = _operands(70, 150, 260, seed=12)          # wgrad layout: b with 1×128 row scales
    (a8, a_s), (b8, b_s) = R.act_quant_ref(a), R.act_quant_ref(b)
    out = G.fp8_gemm(a8.to(dev), a_s.to(dev), b8.to(dev), b_s.to(dev), out_dtype=torch.float32)
    ref = R.act_dequant_ref(a8, a_s).double() @ R.act_dequant_ref(b8, b_s).double().t()
    rows.append(gemm_row("fp8_gemm per-row b scales 70×150×260", out, ref, GEMM_BOUND[dev]))
    dy, _ = _operands(33, 1, 300, seed=13)            # dgrad layout: wᵀ as a strided view, bf16 out
    w = torch.randn(300, 130, generator=torch.Generator().manual_seed(14))
    (d8, d_s), (w8, w_s) = R.act_quant_ref(dy), R.weight_quant_ref(w)
    out = G.fp8_gemm(d8.to(dev), d_s.to(dev), w8.to(dev).t(), w_s.to(dev).t(), out_dtype=torch.bfloat16)
    ref = R.act_dequant_ref(d8, d_s).double() @ R.weight_dequant_ref(w8, w_s).double()
    # one bf16 rounding of each output (test_fp8_gemm: 2^-7 covers the interpreter's truncation) plus, on a
    # GPU, the FP8 accumulation error, whose scale is the output's size, not the element's
    tau, tau_text = (1e-6, "1e-6") if dev == "cpu" else (GEMM_BOUND[dev] * ref.pow(2).mean().sqrt().item(), "1e-3·rms ref")
    worst = ((out.double().cpu() - ref).abs() / (2.0 ** -7 * ref.abs() + tau)).max().item()
    rows.append(("fp8_gemm dgrad view 33×130×300, bf16 out", f"worst abs err / (2^-7·abs ref + {tau_text}) = {worst:.3f}",
                 "<= 1", worst <= 1.0))
    return rows


OFFSETS = [0, 3, 3, 150, 151, 290]   # empty first/middle groups, a ragged 128-tile tail (test_fp8_grouped_gemm)


def _loop_mm(x, w, offsets):
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64, device=x.device)
    for g, (s, e) in enumerate(zip([0] + offsets[:-1], offsets)):
        out[s:e] = x[s:e].double() @ w[g].double().t()
    return out


@check("_grouped_gemm_kernel")
def grouped_gemm(dev, small):
    from triton_kernels import grouped_gemm as GG
    from triton_kernels import quant_ref as R
    rows = []
    cases = [(OFFSETS, 70, 200)] + ([] if small else [([700, 700, 1900, 4096], 2048, 7168)])
    for i, (offsets, N, K) in enumerate(cases):
        M, E = offsets[-1], len(offsets)
        g = torch.Generator().manual_seed(40 + i)
        x = torch.randn(M, K, generator=g) * (1 + 5 * torch.rand(M, 1, generator=g))
        w = torch.randn(E, N, K, generator=g) * (1 + 5 * torch.rand(E, 1, 1, generator=g))
        off = torch.tensor(offsets, dtype=torch.int32)
        (x8, x_s), (w8, w_s) = R.act_quant_ref(x), R.weight_quant_ref(w)
        out = GG.fp8_grouped_gemm(x8.to(dev), x_s.to(dev), w8.to(dev), w_s.to(dev), off.to(dev), out_dtype=torch.float32)
        exact = _loop_mm(R.act_dequant_ref(x8.to(dev), x_s.to(dev)), R.weight_dequant_ref(w8.to(dev), w_s.to(dev)), offsets)
        rows.append(gemm_row(f"grouped fprop M={M} N={N} K={K}, {E} groups", out, exact, GEMM_BOUND[dev]))
        if i == 0:   # dgrad: wᵀ (E, K, N) as a view with the transposed block scales
            dy = x[:, :N].contiguous()
            d8, d_s = R.act_quant_ref(dy)
            out = GG.fp8_grouped_gemm(d8.to(dev), d_s.to(dev), w8.to(dev).transpose(1, 2), w_s.to(dev).transpose(1, 2),
                                      off.to(dev), out_dtype=torch.float32)
            exact = _loop_mm(R.act_dequant_ref(d8, d_s), R.weight_dequant_ref(w8, w_s).transpose(1, 2), offsets)
            rows.append(gemm_row(f"grouped dgrad view M={M} N={K} K={N}", out, exact, GEMM_BOUND[dev]))
    return rows


@check("_grouped_wgrad_kernel")
def grouped_wgrad(dev, small):
    from triton_kernels import grouped_gemm as GG
    from triton_kernels import quant_ref as R
    off = torch.tensor(OFFSETS, dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(290, 200, generator=g) * (1 + 5 * torch.rand(290, 1, generator=g))
    dy = torch.randn(290, 70, generator=torch.Generator().manual_seed(3))
    (dy_t, dy_s), (x_t, x_s) = R.act_quant_t_ref(dy, off), R.act_quant_t_ref(x, off)
    dw = GG.fp8_grouped_wgrad(dy_t.to(dev), dy_s.to(dev), x_t.to(dev), x_s.to(dev), off.to(dev))
    dyd, xd = R.act_dequant_t_ref(dy_t, dy_s, off).double(), R.act_dequant_t_ref(x_t, x_s, off).double()
    ref = torch.stack([dyd[:, s:e] @ xd[:, s:e].t() for s, e in zip([0] + OFFSETS[:-1], OFFSETS)])
    return [gemm_row("grouped wgrad 6 groups, N=70 K=200", dw, ref, GEMM_BOUND[dev])]


# ------------------------------------------------------------------------------------------------ E5M6
@check("_e5m6_quant_kernel", "_e5m6_dequant_kernel", "_e5m6_retile_kernel")
def e5m6_quantisers(dev, small):
    from triton_kernels import e5m6, e5m6_ref
    rows = []
    for i, shape in enumerate([(70, 300), (1, 5), (129, 128)] + ([] if small else [(4096, 2048)])):
        g = torch.Generator().manual_seed(50 + i)
        x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, (shape[1],), generator=g).float())
        q, s = e5m6_ref.e5m6_quant_ref(x)
        q2, s2 = e5m6.e5m6_quant(x.to(dev))
        qt, st = e5m6_ref.e5m6_retile_ref(q, s)
        qt2, st2 = e5m6.e5m6_retile(q.to(dev), s.to(dev))
        rows.append(exact_row(f"e5m6 quant/dequant/retile {shape}", [
            ("quant", q2, q), ("scales", s2, s),
            ("dequant", e5m6.e5m6_dequant(q.to(dev), s.to(dev)), e5m6_ref.e5m6_dequant_ref(q, s)),
            ("retile", qt2, qt), ("retile scales", st2, st)]))
    return rows


@check("_e5m6_wgrad_kernel")
def e5m6_wgrad(dev, small):
    from triton_kernels import e5m6, e5m6_ref
    from triton_kernels.quant_ref import act_quant_t_ref
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(200, 300, generator=g), torch.randn(200, 130, generator=g)
    qt, st = e5m6_ref.e5m6_retile_ref(*e5m6_ref.e5m6_quant_ref(x))
    dy_t, dy_t_s = act_quant_t_ref(dy)
    ref = e5m6_ref.e5m6_wgrad_ref(dy_t, dy_t_s, qt, st)
    got = e5m6.e5m6_wgrad(dy_t.to(dev), dy_t_s.to(dev), qt.to(dev), st.to(dev))
    return [gemm_row("e5m6 wgrad M=200 N=130 K=300", got, ref, E5M6_WGRAD_BOUND)]


# ------------------------------------------------------------- the training ops: all their launches
@check()
def autograd_ops(dev, small):
    """fp8_linear and fp8_grouped_mm forward + backward, triton against the torch backend (test_fp8_linear)."""
    from triton_kernels.fp8_linear import fp8_linear
    from triton_kernels.fp8_grouped_mm import fp8_grouped_mm
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(3, 67, 300, generator=g), torch.randn(70, 300, generator=g) * 0.05, torch.randn(3, 67, 70, generator=g)
    off = torch.tensor(OFFSETS, dtype=torch.int32)
    xe, we = torch.randn(290, 200, generator=g), torch.randn(6, 70, 200, generator=g)
    dye = torch.randn(290, 70, generator=g)
    rows = []
    for name, fn, args, grad in (("fp8_linear", lambda a, b, bk: fp8_linear(a, b, backend=bk), (x, w), dy),
                                 ("fp8_grouped_mm", lambda a, b, bk: fp8_grouped_mm(a, b, off.to(a.device), backend=bk),
                                  (xe, we), dye)):
        res = {}
        for backend, d in (("triton", dev), ("torch", "cpu")):
            a, b = (t.to(d).requires_grad_() for t in args)
            y = fn(a, b, backend)
            y.backward(grad.to(d))
            res[backend] = (y, a.grad, b.grad)
        errs = [rel_fro(t.cpu(), r) for t, r in zip(res["triton"], res["torch"])]
        bound = GEMM_BOUND[dev]
        rows.append((f"{name} triton vs torch: y, dx, dW", ", ".join(f"{e:.1e}" for e in errs), f"< {bound:.0e}",
                     max(errs) < bound))
    return rows


def run_checks(dev: str, small: bool, emit) -> tuple[list[str], list[str], int]:
    """Run every check, ``emit(row)`` as each finishes. Returns (kernels found, not covered, failed rows)."""
    failed = 0
    for kernels, fn in CHECKS:
        try:
            rows = fn(dev, small)
        except Exception as e:  # noqa: BLE001 - a broken kernel or API change is a failed row, not a crash
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rows = [(fn.__name__, f"error: {msg}", "-", False)]
        for what, measured, bound, ok in rows:
            failed += not ok
            emit((what, ", ".join(kernels) or "(all launches of the op)", measured, bound, "PASS" if ok else "FAIL"))
    found = kernels_in_sources()
    covered = {k for kernels, _ in CHECKS for k in kernels}
    return sorted(found), sorted(set(found) - covered), failed
